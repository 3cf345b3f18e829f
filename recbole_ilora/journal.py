"""Append-only JSON-lines journals: what a long evaluation has computed so far, so that a killed one resumes there.

A generative run's tests on SmolLM2 and two CPU cores take about an hour (the uni19 likelihood test, then the
greedy answers); killed in the middle, they used to start again from the first user. The runner keeps two journals
next to the model checkpoint, which names the weights they were computed with (``saved/<model>-<time>.pth``, a name
no other run takes while its training state exists): the likelihood scores of each prompt already scored, and the
answers already generated. A record is written whole and flushed to disk before the next one is computed; a line
torn by a kill is dropped when the journal is opened again.
"""

import json
import os


class JsonLinesJournal:
    """The complete records of the JSON-lines file ``path`` (``records``), opened for appending more.

    Args:
        path: the file; created if missing.
        fresh: start empty, removing what the file held.
    """

    def __init__(self, path, fresh=False):
        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if fresh and os.path.exists(self.path):
            os.remove(self.path)
        self.records, self._ends = [], []  # each record and the byte offset just after its line
        if os.path.exists(self.path):
            with open(self.path, "rb") as file:
                offset = 0
                for line in file:
                    if not line.endswith(b"\n"):
                        break  # torn by a kill while it was written
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(
                            f"{self.path} line {len(self.records) + 1} is not a JSON record ({error}): this journal is "
                            "not one the plugin wrote; move it away to start the evaluation over."
                        ) from error
                    offset += len(line)
                    self.records.append(record)
                    self._ends.append(offset)
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed by close())
        self._file.truncate(self._ends[-1] if self._ends else 0)

    def keep(self, count):
        """Forget every record after the first ``count`` (in the file too)."""
        del self.records[count:]
        del self._ends[count:]
        self._file.truncate(self._ends[-1] if self._ends else 0)

    def append(self, records):
        """Write ``records`` (JSON-serialisable), then flush them to disk."""
        for record in records:
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            self._file.write(line)
            self.records.append(record)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(line))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
