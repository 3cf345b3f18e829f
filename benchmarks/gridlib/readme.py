"""The README's results sections, copied from each dataset's report between its markers."""

import re

from benchmarks.gridlib.rows import REPO

README_SECTIONS = {  # the results file's sections the README shows, per dataset (between its results markers)
    "ml-100k": ("Full ranking", "20 candidates", "The paper's protocol", "The paper's claims"),
    "lastfm": ("The paper's claims",),
}


def markdown_tables(body):
    """The tables of a markdown section, each as one string of its lines (text between them left out)."""
    tables, current = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def without_last_column(table):
    """A markdown table without its last column (the claims table's 'why', pages long: the results file keeps it);
    escaped pipes (``\\|``) inside a cell are not column breaks."""
    lines = []
    for line in table.splitlines():
        cells = re.split(r"(?<!\\)\|", line.rstrip())  # '| a | b |' -> ['', ' a ', ' b ', '']
        lines.append("|".join(cells[:-2] + [""]))
    return "\n".join(lines)


def update_readme(dataset, markdown, done, planned, readme=REPO / "README.md"):
    """Copy the tables of ``README_SECTIONS[dataset]`` of a results file into ``readme``, between its
    ``results:<dataset>`` markers (nothing happens where they are missing). The claims table comes without its 'why'
    column, which is linked to."""
    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- results:{dataset} -->", f"<!-- /results:{dataset} -->"
    if dataset not in README_SECTIONS or start not in text or end not in text:
        return
    sections = markdown.split("\n## ")
    wanted = [section for section in sections if section.startswith(README_SECTIONS[dataset])]
    block = [f"{dataset}, {done} of {planned} runs finished (tables copied from `results/{dataset}.md`):", ""]
    for section in wanted:
        title, _, body = section.partition("\n")
        tables = markdown_tables(body)
        if title.startswith("The paper's claims"):
            tables = [without_last_column(table) for table in tables]
            link = f"[results/{dataset}.md](results/{dataset}.md#the-papers-claims)"
            title += f" (why each verdict, with its evidence: {link})"
        block += [f"**{title.strip()}**", ""] + [line for table in tables for line in (table, "")]
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(before + start + "\n" + "\n".join(block) + end + after, encoding="utf-8")
