"""Summarise a generative model's answers (``python -m recbole_ilora.generative <checkpoint> --output answers.jsonl``)
next to its SASRec encoder ranking the very same candidates, into one JSON:

    python benchmarks/answers_summary.py answers.jsonl --encoder <SASRec checkpoint> --output summary.json

ValidRatio, HR@1 (valid), HR@1 (all); the encoder's Hit@1 on the same 20 candidates per user; the per-user paired
difference of the two (share answered right, its standard error, z); what the model answered (distinct answers,
the most frequent and its share, answers naming no candidate or several). The answers are kept gzipped next to the
summary; the encoder's per-user verdicts too.
"""

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("answers")
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--note", default="", help="how the answers were produced (kept in the summary)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    import claims
    from machine import git_commit, hardware

    from benchmarks.gridlib.report_standard import answer_statistics
    from recbole_ilora.generative import summarize_verdicts

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    answers = output.with_suffix(".generations.jsonl.gz")
    with open(args.answers, "rb") as source, gzip.open(answers, "wb") as target:
        shutil.copyfileobj(source, target)
    lines = [json.loads(line) for line in gzip.open(answers, "rt", encoding="utf-8")]
    summary = summarize_verdicts([(line["valid"], line["correct"]) for line in lines])
    encoder = claims.encoder_on_candidates(answers, args.encoder, output.with_suffix(".encoder-on-candidates.json"))
    mine = {line["user_id"]: bool(line["correct"]) for line in lines}
    result = {
        "note": args.note,
        "commit": git_commit(),
        "hardware": hardware(),
        "answers": summary,
        "encoder_hit@1_same_candidates": encoder["hit@1"],
        "paired_vs_encoder": claims.paired(mine, encoder["per_user"]),
        "answer_statistics": answer_statistics(answers),
        "encoder": args.encoder,
    }
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "answer_statistics"}, indent=1))
    print(json.dumps(result["answer_statistics"], indent=1))


if __name__ == "__main__":
    main()
