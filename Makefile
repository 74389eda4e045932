VENV ?= .venv
export VENV

.PHONY: quickstart test
$(VENV)/.bootstrapped: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)

quickstart: $(VENV)/.bootstrapped
	bash scripts/quickstart.sh

test: $(VENV)/.bootstrapped
	bash scripts/system_deps.sh
	$(VENV)/bin/python -m pytest -q
