"""docs/python.md: its training loop on a user's own BN conv net runs exactly as written, and learns."""

import re
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"
RULE_LINE = 'rule = lc.make_rule("local-learned", net, lr=1e-3, loss="ce")'


def training_loop() -> str:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert RULE_LINE in code
    return code


@pytest.mark.parametrize("rule_line,floor", [
    (RULE_LINE, 0.75),  # measured 0.802
    ('rule = lc.make_rule("fa", net, lr=1e-3)', 0.78),  # measured 0.839
])
def test_the_documented_training_loop_learns(rule_line, floor):
    printed = StringIO()
    with redirect_stdout(printed):
        exec(compile(training_loop().replace(RULE_LINE, rule_line), str(DOC), "exec"), {})
    lines = printed.getvalue().strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("epoch 2: loss "), lines
    accuracy = float(lines[-1].rsplit(" ", 1)[-1])
    assert accuracy >= floor, lines
