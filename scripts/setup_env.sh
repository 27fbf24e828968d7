# Sourced by scripts/*.sh: create .venv and install the package with pinned versions.
# pip's output goes to .venv/pip.log (one line here); if pip fails, the log's tail is shown.
pip_install() {
  if ! .venv/bin/python -m pip install --disable-pip-version-check "$@" >> .venv/pip.log 2>&1; then
    echo "pip install $* failed; the end of .venv/pip.log:" >&2
    tail -n 40 .venv/pip.log >&2
    return 1
  fi
}
python3 -m venv .venv
: > .venv/pip.log
echo "Installing into .venv with the versions in requirements/constraints.txt (log: .venv/pip.log)"
pip_install --upgrade pip
pip_install -e ".[test]" -c requirements/constraints.txt
