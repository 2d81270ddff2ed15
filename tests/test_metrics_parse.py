"""A small strict parser of the Prometheus text format 0.0.4 (for the metrics tests),
and tests that it refuses what the format does not allow.

``parse(text)`` returns the families in order, each with its HELP, TYPE and samples;
anything the format does not allow raises ``FormatError``: a sample before its TYPE,
a family's samples split up, a family or a series twice, a bad name, a bad escape,
an unquoted or unterminated label value, a value that is not a float, a missing
final newline. Histograms are checked too (sorted ``le``, cumulative counts, a
``+Inf`` bucket equal to ``_count``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pytest

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


class FormatError(ValueError):
    pass


@dataclass
class Family:
    name: str
    help: str = ""
    type: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, **labels: str) -> float:
        """The one sample with exactly these labels (histograms: by full name)."""
        found = [v for _, lab, v in self.samples if lab == labels]
        if len(found) != 1:
            raise KeyError(f"{self.name}{labels}: {len(found)} samples")
        return found[0]


def _unescape_help(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text) or text[i + 1] not in ("\\", "n"):
                raise FormatError(f"bad escape in HELP: {text!r}")
            out.append(ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _labels(text: str, at: int) -> tuple[dict[str, str], int]:
    """Labels from ``text[at]`` == "{" to the closing "}"; returns them and the index after."""
    labels: dict[str, str] = {}
    i = at + 1
    while True:
        if text[i : i + 1] == "}":
            return labels, i + 1
        m = LABEL_NAME.match(text, i)
        if not m:
            raise FormatError(f"bad label name at {i}: {text!r}")
        name = m.group()
        i = m.end()
        if text[i : i + 2] != '="':
            raise FormatError(f'label {name} without ="value": {text!r}')
        i += 2
        value = []
        while True:
            if i >= len(text):
                raise FormatError(f"unterminated label value: {text!r}")
            ch = text[i]
            if ch == "\\":
                nxt = text[i + 1 : i + 2]
                if nxt not in ESCAPES:
                    raise FormatError(f"bad escape \\{nxt} in label value: {text!r}")
                value.append(ESCAPES[nxt])
                i += 2
            elif ch == '"':
                i += 1
                break
            elif ch == "\n":
                raise FormatError("raw newline in a label value")
            else:
                value.append(ch)
                i += 1
        if name in labels:
            raise FormatError(f"label {name} twice: {text!r}")
        labels[name] = "".join(value)
        if text[i : i + 1] == ",":
            i += 1
        elif text[i : i + 1] != "}":
            raise FormatError(f"expected , or }} after label {name}: {text!r}")


def _value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        raise FormatError(f"bad value {text!r}")
    return float(text)


def _family_of(sample: str, family: Family) -> bool:
    if family.type == "histogram":
        return sample in (f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count")
    return sample == family.name


def parse(text: str) -> dict[str, Family]:
    if not text.endswith("\n"):
        raise FormatError("the exposition must end with a newline")
    families: dict[str, Family] = {}
    current: Family | None = None
    series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            if not METRIC_NAME.fullmatch(name) or name in families:
                raise FormatError(f"bad or repeated family {name!r}")
            current = families[name] = Family(name, _unescape_help(help_text))
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            if current is None or current.name != name or current.type:
                raise FormatError(f"TYPE of {name} not right after its HELP")
            if kind not in TYPES:
                raise FormatError(f"unknown type {kind!r}")
            current.type = kind
        elif line.startswith("#") or not line:
            raise FormatError(f"unexpected line {line!r} (no comments or blanks here)")
        else:
            m = METRIC_NAME.match(line)
            if not m:
                raise FormatError(f"bad sample line {line!r}")
            name, i = m.group(), m.end()
            labels: dict[str, str] = {}
            if line[i : i + 1] == "{":
                labels, i = _labels(line, i)
            if line[i : i + 1] != " ":
                raise FormatError(f"no space before the value: {line!r}")
            parts = line[i + 1 :].split(" ")
            if len(parts) not in (1, 2):
                raise FormatError(f"bad value part: {line!r}")
            value = _value(parts[0])
            if current is None or not current.type or not _family_of(name, current):
                raise FormatError(f"sample {name} outside its family (TYPE first, together)")
            key = (name, tuple(sorted(labels.items())))
            if key in series:
                raise FormatError(f"series twice: {line!r}")
            series.add(key)
            current.samples.append((name, labels, value))
    for family in families.values():
        if not family.type:
            raise FormatError(f"{family.name} has no TYPE")
        if family.type == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: Family) -> None:
    buckets = [(lab["le"], v) for name, lab, v in family.samples if name.endswith("_bucket")]
    if not buckets or buckets[-1][0] != "+Inf":
        raise FormatError(f"{family.name}: no +Inf bucket last")
    bounds = [_value(le) for le, _ in buckets]
    counts = [v for _, v in buckets]
    if bounds != sorted(bounds) or counts != sorted(counts):
        raise FormatError(f"{family.name}: buckets not sorted or not cumulative")
    count = [v for name, _, v in family.samples if name == f"{family.name}_count"]
    total = [v for name, _, v in family.samples if name == f"{family.name}_sum"]
    if count != [counts[-1]] or len(total) != 1 or math.isnan(total[0]):
        raise FormatError(f"{family.name}: _count must equal the +Inf bucket, one _sum")


# ------------------------------------------------------------------ the parser's own tests

GOOD = (
    '# HELP a_total A "counter" with \\\\ and \\n.\n# TYPE a_total counter\n'
    'a_total{x="q\\"uote",y="back\\\\slash\\nnew"} 3\n'
    "# HELP h A histogram.\n# TYPE h histogram\n"
    'h_bucket{le="0.5"} 1\nh_bucket{le="+Inf"} 2\nh_sum 0.75\nh_count 2\n'
)


def test_parser_reads_escapes_and_histograms() -> None:
    families = parse(GOOD)
    assert families["a_total"].help == 'A "counter" with \\ and \n.'
    assert families["a_total"].value(x='q"uote', y="back\\slash\nnew") == 3
    assert families["h"].type == "histogram"


@pytest.mark.parametrize("bad", [
    GOOD[:-1],  # no final newline
    "a 1\n",  # no TYPE
    "# HELP a x\n# TYPE a gauge\na 1\n# HELP b y\n# TYPE b gauge\nb 1\na 2\n",  # split up
    "# HELP a x\n# TYPE a gauge\na 1\na 2\n",  # a series twice
    '# HELP a x\n# TYPE a gauge\na{x="\\t"} 1\n',  # bad escape
    '# HELP a x\n# TYPE a gauge\na{x=y} 1\n',  # unquoted
    '# HELP a x\n# TYPE a gauge\na{x="y} 1\n',  # unterminated
    "# HELP a x\n# TYPE a gauge\na one\n",  # not a number
    "# HELP a x\n# TYPE a meter\na 1\n",  # unknown type
    "# HELP 1a x\n# TYPE 1a gauge\n1a 1\n",  # bad name
    "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
    "h_sum 1\nh_count 1\n",  # not cumulative
    "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
])  # fmt: skip
def test_parser_refuses_what_the_format_does_not_allow(bad: str) -> None:
    with pytest.raises(FormatError):
        parse(bad)
