# make install | test | lint | demo. Everything runs in .venv, created on first use.
PY := .venv/bin/python
STAMP := .venv/.installed-requirements
DATA := data/shapes
SHAPES := $(DATA)/WORDMAP_shapes_5_cap_per_img_5_min_word_freq.json
ENCODER := $(DATA)/encoder_resnet18_stages2.pt
# Runs a stage and prints one line with its wall time.
STAGE = @start=$$(date +%s); echo "== $(1)"; $(2) && echo "== $(1): done in $$(( $$(date +%s) - start )) s"

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

# The demo: every stage runs only when its output is missing or older than what it is made from, so
# a second `make demo` reuses the data, the encoder and the trained runs (`make clean` starts over).
$(SHAPES): shapes.py create_input_files.py | install
	$(call STAGE,prepare shapes data,$(PY) create_input_files.py --dataset shapes --output-folder $(DATA) --overwrite)

$(ENCODER): $(SHAPES) pretrain_encoder.py
	$(call STAGE,pretrain the encoder,$(PY) pretrain_encoder.py --output-folder $(DATA))

# Static pattern rules: their targets are ordinary files, so a missing one is always made (implicit
# rules would treat them as intermediate and skip them when reports/demo/report.md looks up to date).
DECODERS := rnn attention
TRAINED := $(DECODERS:%=runs/demo-%/.trained)
EVALS := $(DECODERS:%=runs/demo-%/eval_TEST.json)
CAPTIONS := $(DECODERS:%=runs/demo-%/captions/.done)

# .trained marks a training run that finished (an interrupted one leaves a best.pt behind too).
$(TRAINED): runs/demo-%/.trained: $(ENCODER) configs/shapes.yaml
	$(call STAGE,train $*,$(PY) train.py --decoder $* --config configs/shapes.yaml --out runs/demo-$* --overwrite)
	touch $@

$(EVALS): runs/demo-%/eval_TEST.json: runs/demo-%/.trained
	$(call STAGE,evaluate $*,$(PY) eval.py --checkpoint runs/demo-$*/best.pt --split TEST --beam-size 1 3 5)

$(CAPTIONS): runs/demo-%/captions/.done: runs/demo-%/.trained
	$(call STAGE,caption samples with $*,$(PY) caption.py --checkpoint runs/demo-$*/best.pt \
		--folder $(DATA)/samples --beam-size 3 --out runs/demo-$*/captions)
	touch $@

reports/demo/report.md: $(EVALS) compare.py
	$(call STAGE,compare,$(PY) compare.py runs/demo-rnn runs/demo-attention --out reports/demo)

demo: install reports/demo/report.md $(CAPTIONS)
	@echo "demo done: report in reports/demo/report.md, results in runs/demo-*/eval_TEST.json," \
		"overlays in runs/demo-*/captions/"

clean:
	rm -rf $(DATA) runs/demo-rnn runs/demo-attention .pytest_cache .ruff_cache
