# Sourced by scripts/*.sh: create .venv and install the package with pinned versions.
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]" -c requirements/constraints.txt
