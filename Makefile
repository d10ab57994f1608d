# The course's two commands: `make run` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
WORK ?= work
ARGS ?=

.PHONY: run test venv notebooks clean system-run system-test

$(VENV)/.installed: pyproject.toml jupyter-config/jupyter_server_config.json
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e . --config-settings editable_mode=compat
	$(PY) -m helpers notebooks --jupyter-settings  # JupyterLab lists each notebook once (the .py sources hidden)
	touch $@

venv: $(VENV)/.installed

# git, git-lfs, a CJK font (and a browser for the tests): installed where the set-up can (apt-get as root,
# conda, brew); otherwise it stops here, before anything runs, saying what to install.
system-run system-test:
	python3 helpers/system_setup.py $(@:system-%=%)

run: system-run venv  ## run every notebook headless on the embedded tiny model into $(WORK)
	$(PY) -m helpers run --work-dir $(WORK) $(ARGS)

test: system-test venv  ## unit tests, the headless pipeline, and nbval over notebooks/
	$(PY) -m pytest tests --nbval-lax notebooks $(ARGS)

notebooks: venv  ## rewrite notebooks/*.ipynb from their .py sources
	$(PY) -m helpers notebooks

clean:
	rm -rf $(WORK)
