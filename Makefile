# Two commands do all the set-up on a fresh machine:
#   make demo    # the main job: train a small GPT with fa2-jax attention
#   make test    # the test suite (Pallas kernels in interpret mode on a CPU)
# On a GPU: `make test PYTEST_ARGS=--compiled`.
# Python 3.12: from PATH if it runs, else pyenv's 3.12 (which this machine has).
PYTHON ?= $(shell for p in python3.12 "$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12" "$$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12.*/bin/python3.12 2>/dev/null | tail -1)"; do "$$p" --version >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV ?= .venv
# pytest-xdist workers: one per core, at most 4 (each holds its own JAX).
PYTEST_ARGS ?= -n $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: demo test install

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo 'Python 3.12 not found: set PYTHON=/path/to/python3.12'; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/python examples/train_gpt.py

test: install
	$(VENV)/bin/python -m pytest tests -q $(PYTEST_ARGS)
