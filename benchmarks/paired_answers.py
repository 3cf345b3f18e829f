"""Two generative runs' answers compared user by user (the paper's protocol; every run of a seed answers the very
same candidate lists):

    python benchmarks/paired_answers.py A.generations.jsonl.gz B.generations.jsonl.gz --output a-vs-b.json

Checks that both files hold the same users with the same candidates and target (else it stops, naming the first
user that differs), then writes each run's ValidRatio and HR@1s, the 2 x 2 table of users answered right by both,
by A only, by B only, by neither, and the paired difference of HR@1 (all) with its standard error and z
(``benchmarks/claims.py``'s ``paired``). Nothing is trained or generated.
"""

import argparse
import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def read_answers(path):
    """{user: line} of a generations file (gzipped or not)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as file:
        return {(line := json.loads(text))["user_id"]: line for text in file if text.strip()}


def compare(a, b):
    """The comparison of two {user: line} answer sets on the same candidate lists (see the module docstring)."""
    import claims

    from recbole_ilora.generative import summarize_verdicts

    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        raise ValueError(f"the two files answer different users (e.g. {only})")
    for user in sorted(a):
        if a[user]["candidates"] != b[user]["candidates"] or a[user]["target"] != b[user]["target"]:
            raise ValueError(f"user {user} has other candidates or another target in the two files: not paired")
    right_a = {user: bool(line["correct"]) for user, line in a.items()}
    right_b = {user: bool(line["correct"]) for user, line in b.items()}
    table = {
        "both": sum(right_a[u] and right_b[u] for u in a),
        "a_only": sum(right_a[u] and not right_b[u] for u in a),
        "b_only": sum(right_b[u] and not right_a[u] for u in a),
        "neither": sum(not right_a[u] and not right_b[u] for u in a),
    }
    return {
        "users": len(a),
        "a": summarize_verdicts([(line["valid"], line["correct"]) for line in a.values()]),
        "b": summarize_verdicts([(line["valid"], line["correct"]) for line in b.values()]),
        "right": table,
        "same_answer": sum(a[u]["output"].strip() == b[u]["output"].strip() for u in a),
        "paired_a_minus_b": claims.paired(right_a, right_b),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--output", required=True)
    parser.add_argument("--note", default="", help="which runs these are (kept in the output)")
    args = parser.parse_args()
    from machine import git_commit

    result = {"note": args.note, "a": args.a, "b": args.b, "commit": git_commit()}
    result.update(comparison=compare(read_answers(args.a), read_answers(args.b)))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
