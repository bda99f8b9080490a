# make install | test | lint | demo. Everything runs in .venv, created on first use.
PY := .venv/bin/python
STAMP := .venv/.installed-requirements
SHAPES := data/shapes/WORDMAP_shapes_5_cap_per_img_5_min_word_freq.json

.PHONY: install test lint demo clean

install: $(STAMP)

# Reinstalls only when requirements.txt changes, so a second `make install` takes no time.
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .

# Prepared once; prepared again only when the generator changes.
$(SHAPES): shapes.py create_input_files.py | install
	$(PY) create_input_files.py --dataset shapes --output-folder data/shapes --overwrite

demo: install $(SHAPES)
	@echo "demo: shapes data is ready in data/shapes. Training, evaluation and the comparison"
	@echo "report are not implemented yet, so the demo stops after data preparation."

clean:
	rm -rf data/shapes .pytest_cache .ruff_cache
