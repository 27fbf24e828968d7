"""The README's Python snippet runs as written."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_python_snippet_runs():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Use it from Python", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (2, 32, 32, 8)
    assert namespace["samples"].shape == (2, 32, 32, 4)
