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

# Each stage runs only when its output is missing or older than what it is made from, so a
# second `make demo` reuses the data and the trained runs (`make clean` starts over).
$(SHAPES): shapes.py create_input_files.py | install
	$(PY) create_input_files.py --dataset shapes --output-folder data/shapes --overwrite

# .trained marks a training run that finished (an interrupted one leaves a best.pt behind too).
runs/demo-%/.trained: $(SHAPES) configs/shapes.yaml
	$(PY) train.py --decoder $* --config configs/shapes.yaml --out runs/demo-$* --overwrite
	touch $@

runs/demo-%/eval_TEST.json: runs/demo-%/.trained
	$(PY) eval.py --checkpoint runs/demo-$*/best.pt --split TEST --beam-size 1 3 5

.SECONDARY:  # keep the intermediate files of the chain above

demo: install runs/demo-rnn/eval_TEST.json runs/demo-attention/eval_TEST.json
	$(PY) caption.py --checkpoint runs/demo-attention/best.pt --folder data/shapes/samples --beam-size 3 \
		--out runs/demo-attention/captions
	$(PY) caption.py --checkpoint runs/demo-rnn/best.pt --folder data/shapes/samples --beam-size 3 \
		--out runs/demo-rnn/captions
	@echo "demo done: results in runs/demo-*/eval_TEST.json, overlays in runs/demo-*/captions/"

clean:
	rm -rf data/shapes runs/demo-rnn runs/demo-attention .pytest_cache .ruff_cache
