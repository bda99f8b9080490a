# Targets (everything runs in .venv, created on first use):
#   install     .venv with the packages of requirements.txt and this project (pip install -e .)
#   test        the whole test suite, what CI runs
#   test-fast   the tests that start no subprocess, for the edit-and-test loop
#   lint        ruff
#   browser     the system's Chromium (apt), for the tests of the HTML pages
#   demo        shapes data, pretrained encoder, both decoders trained and evaluated, reports/demo/
#               (report.md, and report.html with a browser of every TEST image)
#   bench       the CPU benchmark matrix into docs/bench_cpu.json
#   study       the optimisation study (fp32, bf16, accumulation, early stopping) into reports/study/
#   scst        self-critical training from the two demo checkpoints, evaluated, into reports/scst/
#   hard        hard attention on the demo's data, evaluated both ways, compared with the demo: reports/hard/
#   tutorial    docs/tutorial.md's code on the demo's data and models, which redraws docs/tutorial/*.png
#   gpu-wheels  PyYAML wheels for a GPU machine without internet (.wheels/)
#   clean       remove the demo's data and runs
PY := .venv/bin/python
STAMP := .venv/.installed-requirements
DATA := data/shapes
SHAPES := $(DATA)/WORDMAP_shapes_5_cap_per_img_5_min_word_freq.json
ENCODER := $(DATA)/encoder_resnet18_stages2.pt
# More options for the demo's data and its encoder, e.g. make demo SHAPES_ARGS="--num-images 2000"
# PRETRAIN_ARGS="--steps 100" for a smaller, quicker demo (the tests run one with fewer steps).
SHAPES_ARGS ?=
PRETRAIN_ARGS ?=
# Test processes (pytest-xdist; auto: one per core), each with one thread so that they share the
# cores instead of contending for them. A test file runs whole in one process, in order
# (--dist loadfile): tests/test_docs.py's pages build on each other in one workspace.
TEST_WORKERS ?= auto
PYTEST = OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile
# Runs a stage and prints one line with its wall time.
STAGE = @start=$$(date +%s); echo "== $(1)"; $(2) && echo "== $(1): done in $$(( $$(date +%s) - start )) s"

.PHONY: install test test-fast lint browser demo bench study scst hard tutorial gpu-wheels clean

install: $(STAMP)

# Reinstalls only when requirements.txt or pyproject.toml change, so a second `make install` takes no
# time. The editable install (-e .) lets the project's Python import its modules from any folder.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

lint: install
	$(PY) -m ruff check .

# Playwright drives this browser in tests/test_htmlpage.py; it never downloads one of its own.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium; }
	@echo "chromium: $$(command -v chromium || command -v chromium-browser)"

# The demo: every stage runs only when its output is missing or older than what it is made from, so
# a second `make demo` reuses the data, the encoder and the trained runs (`make clean` starts over).
$(SHAPES): shapes.py create_input_files.py | install
	$(call STAGE,prepare shapes data,$(PY) create_input_files.py --dataset shapes --output-folder $(DATA) \
		--overwrite $(SHAPES_ARGS))

$(ENCODER): $(SHAPES) pretrain_encoder.py
	$(call STAGE,pretrain the encoder,$(PY) pretrain_encoder.py --output-folder $(DATA) $(PRETRAIN_ARGS))

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
	@echo "demo done: report in reports/demo/report.md and report.html, results in runs/demo-*/eval_TEST.json," \
		"overlays in runs/demo-*/captions/"

# The CPU benchmark matrix on the shapes model and vocabulary (docs/benchmarks.md quotes docs/bench_cpu.json).
bench: install
	$(PY) bench.py --config configs/shapes.yaml --image-size 64 --vocab 44 --profile --out docs/bench_cpu.json

# The optimisation study: the plain decoder on shapes, 15 epochs, one change per run against study-fp32.
# best.pt and early stopping follow validation BLEU-4, the reference experiment's rule.
STUDY_RUNS := fp32 bf16 acc4 early
STUDY_ARGS := --decoder rnn --config configs/shapes.yaml --epochs 15 --patience 0 --log_every 5 \
	--early_stop_metric bleu4
STUDY_fp32 :=
STUDY_bf16 := --amp true --amp_dtype bfloat16
STUDY_acc4 := --batch_size 8 --accumulation_steps 4
STUDY_early := --patience 1
STUDY_EVALS := $(STUDY_RUNS:%=runs/study-%/eval_TEST.json)

$(STUDY_EVALS): runs/study-%/eval_TEST.json: $(ENCODER) configs/shapes.yaml
	$(call STAGE,study: train $*,$(PY) train.py $(STUDY_ARGS) $(STUDY_$*) --out runs/study-$* --overwrite)
	$(call STAGE,study: evaluate $*,$(PY) eval.py --checkpoint runs/study-$*/best.pt --beam-size 3)

study: install $(STUDY_EVALS)
	$(call STAGE,study: compare,$(PY) compare.py $(STUDY_RUNS:%=runs/study-%) --out reports/study --beam-size 3)

# Self-critical training (CIDEr-D reward) from each demo checkpoint: 2 epochs, the mean baseline, 5 samples,
# then TEST at beam 1 and 3 and the four-run comparison (makes the demo runs first when they are missing).
# The attention decoder at lr 2e-5: at 5e-5 its relation accuracy fell below the cross-entropy model's.
SCST_ARGS := --objective scst --epochs 2 --scst_max_len 30 --overwrite
SCST_rnn :=
SCST_attention := --scst_lr 2e-5
SCST_EVALS := $(DECODERS:%=runs/scst-%/eval_TEST.json)

$(SCST_EVALS): runs/scst-%/eval_TEST.json: runs/demo-%/eval_TEST.json
	$(call STAGE,scst: train $*,$(PY) train.py --init_from runs/demo-$*/best.pt --out runs/scst-$* $(SCST_ARGS) $(SCST_$*))
	$(call STAGE,scst: evaluate $*,$(PY) eval.py --checkpoint runs/scst-$*/best.pt --beam-size 1 3)

reports/scst/report.md: $(SCST_EVALS) compare.py
	$(call STAGE,scst: compare,$(PY) compare.py runs/demo-rnn runs/scst-rnn runs/demo-attention runs/scst-attention \
		--out reports/scst --beam-size 3)

scst: install reports/scst/report.md

# Hard attention (Xu et al. 2015, section 4.1) on the demo's data, encoder and settings, evaluated with both
# inferences (the expected context, and the argmax cell), then compared with the two demo runs.
HARD_ARGS := --attention hard --hard_estimator gumbel

runs/hard-attention/.trained: $(ENCODER) configs/shapes.yaml
	$(call STAGE,hard: train,$(PY) train.py --decoder attention --config configs/shapes.yaml $(HARD_ARGS) \
		--out runs/hard-attention --overwrite)
	touch $@

runs/hard-attention/eval_TEST.json: runs/hard-attention/.trained
	$(call STAGE,hard: evaluate (expected context),$(PY) eval.py --checkpoint runs/hard-attention/best.pt --beam-size 1 3)
	$(call STAGE,hard: evaluate (argmax cell),$(PY) eval.py --checkpoint runs/hard-attention/best.pt --beam-size 1 3 \
		--hard-inference argmax --out runs/hard-attention/eval_TEST_argmax.json)

reports/hard/report.md: $(EVALS) runs/hard-attention/eval_TEST.json compare.py
	$(call STAGE,hard: compare,$(PY) compare.py runs/demo-rnn runs/demo-attention runs/hard-attention \
		runs/hard-attention/eval_TEST_argmax.json --out reports/hard --beam-size 3)

hard: install reports/hard/report.md

# The tutorial reads the demo's data and models; its code writes the figures docs/tutorial.md shows.
tutorial: demo
	$(PY) scripts/run_docs.py docs/tutorial.md

# PyYAML wheels for a GPU machine whose image lacks it: scripts/gpu_bench.sh installs from .wheels/.
gpu-wheels: install
	for v in 3.10 3.11 3.12 3.13; do $(PY) -m pip download -q pyyaml --only-binary=:all: --no-deps \
		--python-version $$v --platform manylinux2014_x86_64 -d .wheels; done

clean:
	rm -rf $(DATA) runs/demo-rnn runs/demo-attention runs/scst-rnn runs/scst-attention runs/hard-attention \
		.pytest_cache .ruff_cache
