# Targets (everything runs in .venv, created on first use):
#   install     .venv with the packages of requirements.txt and this project (pip install -e .)
#   test        the whole test suite, what CI runs
#   test-fast   the tests that need no prepared data, trained model or process of their own, for the
#               edit-and-test loop (under a minute)
#   coverage    make test with line coverage (pytest-cov), the scripts' subprocesses counted too
#   lint        ruff
#   browser     the system's Chromium (apt), for the tests of the HTML pages
#   demo        shapes data, pretrained encoder, the three decoders (plain, soft attention, Transformer) trained and
#               evaluated, compared into $(REPORTS)/demo/ (report.md, comparison.json, and report.html with a browser
#               of every TEST image)
#   transformer after the demo: how well each choice of the Transformer's maps (a layer's, their mean) points on VAL
#   seeds       the demo's decoders (rnn, soft and hard attention, the Transformer) at 3 seeds each, compared as
#               groups with an interval on every margin: $(REPORTS)/seeds/
#   length-pool the attention LSTM and the Transformer trained from batches of similar length (length_pool 50) at
#               the seeds' 3 seeds, against their random-batch runs: $(REPORTS)/length-pool/
#   short-training  the attention LSTM and the Transformer at half the demo's training (4 epochs, cosine schedule),
#               what a 10-minute demo could afford on a 2-core Zen 3, at 3 seeds against the seeds': $(REPORTS)/short-training/
#   pointing    what makes attention point (docs/attention-maps.md): the attention LSTM and the Transformer with one
#               design choice changed each, against the seeds' soft, hard and Transformer groups: $(REPORTS)/pointing/
#   bench       the CPU benchmark matrix into docs/bench_cpu.json
#   study       the optimisation study (fp32, bf16, accumulation, early stopping) into $(REPORTS)/study/
#   scst        self-critical training from the demo's two LSTM checkpoints, evaluated, into $(REPORTS)/scst/
#   hard        hard attention on the demo's data, evaluated both ways, compared with the demo: $(REPORTS)/hard/
#   hard-estimators  the paper's REINFORCE estimator, with and without its REINFORCE term, against make hard's
#               Gumbel-softmax and soft attention: $(REPORTS)/hard-estimators/
#   reports     every report above made again into reports/, the copies the README and docs link to (tracked)
#   tutorial    docs/tutorial.md's code on the demo's data and models; redraws docs/tutorial/*.png
#   gpu-wheels  PyYAML wheels for a GPU machine without internet (.wheels/)
#   clean       remove the demo's data, runs and reports under runs/
PY := .venv/bin/python
STAMP := .venv/.installed-requirements
DATA := data/shapes
SHAPES := $(DATA)/WORDMAP_shapes_5_cap_per_img_5_min_word_freq.json
ENCODER := $(DATA)/encoder_resnet18_stages2.pt
# More options for the demo's data and its encoder, e.g. make demo SHAPES_ARGS="--num-images 2000"
# PRETRAIN_ARGS="--steps 100" for a smaller, quicker demo (the tests run one with fewer steps).
SHAPES_ARGS ?=
PRETRAIN_ARGS ?=
# Where the reports go: runs/reports/ is ignored by git, so that no target changes a tracked file. `make
# reports` sets REPORTS=reports to refresh the committed copies.
REPORTS ?= runs/reports
# results.FORMAT: an evaluation is made again when its stamp of this format is missing (eval.py files of an
# older format lack the per-image statistics compare.py's intervals need).
EVAL_FORMAT := 3
EVALUATED := .evaluated-$(EVAL_FORMAT)
COMPARE_CODE := compare.py report.py significance.py results.py
# Test processes (pytest-xdist; auto: one per core), each with one thread so that they share the
# cores instead of contending for them. A test file runs whole in one process, in order
# (--dist loadfile): tests/test_docs.py's pages build on each other in one workspace, which the
# browser tests share (tests/conftest.py). test_docs.py, the longest, starts first (--no-loadscope-reorder).
TEST_WORKERS ?= auto
PYTEST = OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# Runs a stage and prints one line with its wall time.
STAGE = @start=$$(date +%s); echo "== $(1)"; $(2) && echo "== $(1): done in $$(( $$(date +%s) - start )) s"

.PHONY: install test test-fast coverage lint browser demo transformer seeds length-pool short-training pointing bench study scst hard hard-estimators reports tutorial gpu-wheels \
	clean

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

# Line coverage of the whole suite, scripts started in subprocesses included (coverage.py's subprocess
# patch; [tool.coverage] in pyproject.toml): slower than make test, for the figure, not for every change.
coverage: install
	rm -rf .coverage-data && mkdir .coverage-data
	COVERAGE_ROOT=$(CURDIR) $(PYTEST) --cov --cov-report=term

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
# rules would treat them as intermediate and skip them when a report looks up to date).
DECODERS := rnn attention transformer
TRAINED := $(DECODERS:%=runs/demo-%/.trained)
EVALS := $(DECODERS:%=runs/demo-%/$(EVALUATED))
CAPTIONS := $(DECODERS:%=runs/demo-%/captions/.done)
# The two LSTMs' evaluations, which make scst and make hard compare with.
LSTM_EVALS := runs/demo-rnn/$(EVALUATED) runs/demo-attention/$(EVALUATED)

# .trained marks a training run that finished (an interrupted one leaves a best.pt behind too).
$(TRAINED): runs/demo-%/.trained: $(ENCODER) configs/shapes.yaml
	$(call STAGE,train $*,$(PY) train.py --decoder $* --config configs/shapes.yaml --out runs/demo-$* --overwrite)
	touch $@

$(EVALS): runs/demo-%/$(EVALUATED): runs/demo-%/.trained
	$(call STAGE,evaluate $*,$(PY) eval.py --checkpoint runs/demo-$*/best.pt --split TEST --beam-size 1 3 5)
	touch $@

$(CAPTIONS): runs/demo-%/captions/.done: runs/demo-%/.trained
	$(call STAGE,caption samples with $*,$(PY) caption.py --checkpoint runs/demo-$*/best.pt \
		--folder $(DATA)/samples --beam-size 3 --out runs/demo-$*/captions)
	touch $@

$(REPORTS)/demo/report.md: $(EVALS) $(COMPARE_CODE)
	$(call STAGE,compare,$(PY) compare.py $(DECODERS:%=runs/demo-%) --out $(REPORTS)/demo)

demo: install $(REPORTS)/demo/report.md $(CAPTIONS)
	@echo "demo done: report in $(REPORTS)/demo/report.md and report.html, results in runs/demo-*/eval_TEST.json," \
		"overlays in runs/demo-*/captions/"

# Which of the Transformer's maps point best on VAL (docs/transformer.md): a question about its maps, not part of
# the demo's comparison.
transformer: install runs/demo-transformer/.trained
	$(call STAGE,transformer: pointing of its maps on VAL,$(PY) scripts/transformer_maps.py \
		--checkpoint runs/demo-transformer/best.pt)

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
STUDY_TRAINED := $(STUDY_RUNS:%=runs/study-%/.trained)
STUDY_EVALS := $(STUDY_RUNS:%=runs/study-%/$(EVALUATED))

$(STUDY_TRAINED): runs/study-%/.trained: $(ENCODER) configs/shapes.yaml
	$(call STAGE,study: train $*,$(PY) train.py $(STUDY_ARGS) $(STUDY_$*) --out runs/study-$* --overwrite)
	touch $@

$(STUDY_EVALS): runs/study-%/$(EVALUATED): runs/study-%/.trained
	$(call STAGE,study: evaluate $*,$(PY) eval.py --checkpoint runs/study-$*/best.pt --beam-size 3)
	touch $@

$(REPORTS)/study/report.md: $(STUDY_EVALS) $(COMPARE_CODE)
	$(call STAGE,study: compare,$(PY) compare.py $(STUDY_RUNS:%=runs/study-%) --out $(REPORTS)/study --beam-size 3 \
		$(foreach r,$(filter-out fp32,$(STUDY_RUNS)),--pair study-fp32 study-$(r)))

study: install $(REPORTS)/study/report.md

# Self-critical training (CIDEr-D reward) from each demo checkpoint: 2 epochs, the mean baseline, 5 samples,
# then TEST at beam 1 and 3 and the four-run comparison (makes the demo runs first when they are missing).
# The attention decoder at lr 2e-5: at 5e-5 its relation accuracy fell below the cross-entropy model's.
SCST_ARGS := --objective scst --epochs 2 --scst_max_len 30 --overwrite
SCST_rnn :=
SCST_attention := --scst_lr 2e-5
SCST_DECODERS := rnn attention
SCST_TRAINED := $(SCST_DECODERS:%=runs/scst-%/.trained)
SCST_EVALS := $(SCST_DECODERS:%=runs/scst-%/$(EVALUATED))

$(SCST_TRAINED): runs/scst-%/.trained: runs/demo-%/.trained
	$(call STAGE,scst: train $*,$(PY) train.py --init_from runs/demo-$*/best.pt --out runs/scst-$* $(SCST_ARGS) $(SCST_$*))
	touch $@

$(SCST_EVALS): runs/scst-%/$(EVALUATED): runs/scst-%/.trained
	$(call STAGE,scst: evaluate $*,$(PY) eval.py --checkpoint runs/scst-$*/best.pt --beam-size 1 3)
	touch $@

$(REPORTS)/scst/report.md: $(LSTM_EVALS) $(SCST_EVALS) $(COMPARE_CODE)
	$(call STAGE,scst: compare,$(PY) compare.py runs/demo-rnn runs/scst-rnn runs/demo-attention runs/scst-attention \
		--out $(REPORTS)/scst --beam-size 3 --pair demo-rnn scst-rnn --pair demo-attention scst-attention \
		--pair demo-rnn demo-attention --pair scst-rnn scst-attention)

scst: install $(REPORTS)/scst/report.md

# Hard attention (Xu et al. 2015, section 4.1) on the demo's data, encoder and settings, evaluated with both
# inferences (the expected context, and the argmax cell), then compared with the demo's two LSTMs.
HARD_ARGS := --attention hard --hard_estimator gumbel

runs/hard-attention/.trained: $(ENCODER) configs/shapes.yaml
	$(call STAGE,hard: train,$(PY) train.py --decoder attention --config configs/shapes.yaml $(HARD_ARGS) \
		--out runs/hard-attention --overwrite)
	touch $@

runs/hard-attention/$(EVALUATED): runs/hard-attention/.trained
	$(call STAGE,hard: evaluate (expected context),$(PY) eval.py --checkpoint runs/hard-attention/best.pt --beam-size 1 3)
	$(call STAGE,hard: evaluate (argmax cell),$(PY) eval.py --checkpoint runs/hard-attention/best.pt --beam-size 1 3 \
		--hard-inference argmax --out runs/hard-attention/eval_TEST_argmax.json)
	touch $@

$(REPORTS)/hard/report.md: $(LSTM_EVALS) runs/hard-attention/$(EVALUATED) $(COMPARE_CODE)
	$(call STAGE,hard: compare,$(PY) compare.py runs/demo-rnn runs/demo-attention runs/hard-attention \
		runs/hard-attention/eval_TEST_argmax.json --out $(REPORTS)/hard --beam-size 3 \
		--pair demo-attention hard-attention --pair hard-attention hard-attention-argmax --pair demo-rnn hard-attention)

hard: install $(REPORTS)/hard/report.md

# Hard attention's estimators (docs/hard-attention.md): the paper's REINFORCE (lambda_r 0.1) and the same without
# its REINFORCE term, one run each on the demo's settings, against make hard's Gumbel-softmax and soft attention.
ESTIMATORS := reinforce-0.1 no-reinforce
ESTIMATOR_reinforce-0.1 := --hard_estimator reinforce --hard_lambda_r 0.1
ESTIMATOR_no-reinforce := --hard_estimator reinforce --hard_lambda_r 0
ESTIMATOR_TRAINED := $(ESTIMATORS:%=runs/hx-%/.trained)
ESTIMATOR_EVALS := $(ESTIMATORS:%=runs/hx-%/$(EVALUATED))

$(ESTIMATOR_TRAINED): runs/hx-%/.trained: $(ENCODER) configs/shapes.yaml
	$(call STAGE,hard estimators: train $*,$(PY) train.py --decoder attention --config configs/shapes.yaml \
		--attention hard $(ESTIMATOR_$*) --out runs/hx-$* --overwrite)
	touch $@

$(ESTIMATOR_EVALS): runs/hx-%/$(EVALUATED): runs/hx-%/.trained
	$(call STAGE,hard estimators: evaluate $*,$(PY) eval.py --checkpoint runs/hx-$*/best.pt --beam-size 3)
	touch $@

$(REPORTS)/hard-estimators/report.md: runs/demo-attention/$(EVALUATED) runs/hard-attention/$(EVALUATED) $(ESTIMATOR_EVALS) $(COMPARE_CODE)
	$(call STAGE,hard estimators: compare,$(PY) compare.py runs/demo-attention $(ESTIMATORS:%=runs/hx-%) \
		runs/hard-attention --out $(REPORTS)/hard-estimators --beam-size 3)

hard-estimators: install $(REPORTS)/hard-estimators/report.md

# The seeds study: each of the demo's decoders at two more seeds (its own runs, seed 42, are the first),
# evaluated on TEST at beam 3, then compared as three groups. SEED_ARGS_<decoder> is what `make demo` and
# `make hard` train it with.
SEEDS := 1 2
SEED_DECODERS := rnn attention hard transformer
SEED_ARGS_rnn := --decoder rnn
SEED_ARGS_attention := --decoder attention
SEED_ARGS_hard := --decoder attention $(HARD_ARGS)
SEED_ARGS_transformer := --decoder transformer
SEED_RUNS := $(foreach d,$(SEED_DECODERS),$(SEEDS:%=runs/seeds-$(d)-s%))
SEED_EVALS := $(SEED_RUNS:%=%/$(EVALUATED))

# The runs of a study at several seeds, runs/$(1)-$(2)-s<seed>: train.py with the demo's config and the arguments $(3),
# at each seed of $(4), its stages named "$(5): ..." (make seeds, length-pool and pointing share it).
define SEEDED_RUNS
$(4:%=runs/$(1)-$(2)-s%/.trained): runs/$(1)-$(2)-s%/.trained: $(ENCODER) configs/shapes.yaml
	$$(call STAGE,$(5): train $(2) seed $$*,$$(PY) train.py $(3) --config configs/shapes.yaml \
		--seed $$* --out runs/$(1)-$(2)-s$$* --overwrite)
	touch $$@
endef
$(foreach d,$(SEED_DECODERS),$(eval $(call SEEDED_RUNS,seeds,$(d),$(SEED_ARGS_$(d)),$(SEEDS),seeds)))

$(REPORTS)/seeds/report.md: $(EVALS) runs/hard-attention/$(EVALUATED) $(SEED_EVALS) $(COMPARE_CODE)
	$(call STAGE,seeds: compare,$(PY) compare.py --group rnn runs/demo-rnn $(SEEDS:%=runs/seeds-rnn-s%) \
		--group soft runs/demo-attention $(SEEDS:%=runs/seeds-attention-s%) \
		--group hard runs/hard-attention $(SEEDS:%=runs/seeds-hard-s%) \
		--group transformer runs/demo-transformer $(SEEDS:%=runs/seeds-transformer-s%) --pair rnn soft \
		--pair soft hard --pair rnn hard --pair soft transformer --pair rnn transformer --out $(REPORTS)/seeds \
		--beam-size 3)

seeds: install $(REPORTS)/seeds/report.md

# The attention LSTM and the Transformer trained otherwise (make length-pool, short-training) at the three seeds of
# make demo and make seeds, compared with those runs on TEST at beam 3. VARIANT_GROUPS: compare.py's groups soft,
# soft-$(1), transformer, transformer-$(1), the variant's runs named runs/$(2)-<decoder>-s<seed>.
VARIANT_SEEDS := 42 $(SEEDS)
VARIANT_DECODERS := attention transformer
VARIANT_BASELINE_EVALS := runs/demo-attention/$(EVALUATED) runs/demo-transformer/$(EVALUATED) \
	$(SEEDS:%=runs/seeds-attention-s%/$(EVALUATED)) $(SEEDS:%=runs/seeds-transformer-s%/$(EVALUATED))
VARIANT_GROUPS = --group soft runs/demo-attention $(SEEDS:%=runs/seeds-attention-s%) \
	--group soft-$(1) $(VARIANT_SEEDS:%=runs/$(2)-attention-s%) \
	--group transformer runs/demo-transformer $(SEEDS:%=runs/seeds-transformer-s%) \
	--group transformer-$(1) $(VARIANT_SEEDS:%=runs/$(2)-transformer-s%)

# Batches of similar length (docs/training.md): trained with length_pool 50, against random batches.
POOL_EVALS := $(foreach d,$(VARIANT_DECODERS),$(VARIANT_SEEDS:%=runs/pool-$(d)-s%/$(EVALUATED)))

$(foreach d,$(VARIANT_DECODERS),$(eval $(call SEEDED_RUNS,pool,$(d),--decoder $(d) --length_pool 50,$(VARIANT_SEEDS),length pool)))

$(REPORTS)/length-pool/report.md: $(VARIANT_BASELINE_EVALS) $(POOL_EVALS) $(COMPARE_CODE)
	$(call STAGE,length pool: compare,$(PY) compare.py $(call VARIANT_GROUPS,pooled,pool) --pair soft soft-pooled \
		--pair transformer transformer-pooled --out $(REPORTS)/length-pool --beam-size 3)

length-pool: install $(REPORTS)/length-pool/report.md

# Half the demo's training (docs/benchmarks.md#the-three-decoder-demo-2026-12-07): 4 epochs with the rates falling
# along a half cosine, against the 8-epoch runs.
SHORT_EVALS := $(foreach d,$(VARIANT_DECODERS),$(VARIANT_SEEDS:%=runs/short-$(d)-s%/$(EVALUATED)))

$(foreach d,$(VARIANT_DECODERS),$(eval $(call SEEDED_RUNS,short,$(d),--decoder $(d) --epochs 4 --lr_schedule cosine,$(VARIANT_SEEDS),short training)))

$(REPORTS)/short-training/report.md: $(VARIANT_BASELINE_EVALS) $(SHORT_EVALS) $(COMPARE_CODE)
	$(call STAGE,short training: compare,$(PY) compare.py $(call VARIANT_GROUPS,short,short) --pair soft soft-short \
		--pair transformer transformer-short --pair soft transformer --pair soft-short transformer-short \
		--out $(REPORTS)/short-training --beam-size 3)

short-training: install $(REPORTS)/short-training/report.md

# What makes attention point (docs/attention-maps.md): one design choice changed per variant, on the demo's data
# and schedule, against the seeds' soft, hard and Transformer groups. POINTING_SEEDS_<variant> are its seeds: three
# for the variants that moved pointing or attention mass by more than 10 points at seed 42, and the best LSTM's.
POINTING_VARIANTS := after-word soft-no-ds hard-no-ds positions no-gate after-word-no-ds hard-after-word-no-ds \
	tf-1-layer tf-1-head tf-no-positions
POINTING_ARGS_after-word := --decoder attention --attend_after_word true
POINTING_ARGS_soft-no-ds := --decoder attention --alpha_c 0
POINTING_ARGS_hard-no-ds := --decoder attention $(HARD_ARGS) --alpha_c 0
POINTING_ARGS_positions := --decoder attention --attention_cell_positions true
POINTING_ARGS_no-gate := --decoder attention --attention_gate false
POINTING_ARGS_after-word-no-ds := --decoder attention --attend_after_word true --alpha_c 0
POINTING_ARGS_hard-after-word-no-ds := --decoder attention $(HARD_ARGS) --attend_after_word true --alpha_c 0
POINTING_ARGS_tf-1-layer := --decoder transformer --transformer_layers 1
POINTING_ARGS_tf-1-head := --decoder transformer --transformer_heads 1
POINTING_ARGS_tf-no-positions := --decoder transformer --transformer_cell_positions false
POINTING_SEEDS_after-word := 42 $(SEEDS)
POINTING_SEEDS_soft-no-ds := 42 $(SEEDS)
POINTING_SEEDS_hard-no-ds := 42 $(SEEDS)
POINTING_SEEDS_after-word-no-ds := 42 $(SEEDS)
POINTING_SEEDS_hard-after-word-no-ds := 42 $(SEEDS)
POINTING_SEEDS_tf-1-head := 42 $(SEEDS)
$(foreach v,$(POINTING_VARIANTS),$(eval POINTING_SEEDS_$(v) ?= 42))
POINTING_RUNS := $(foreach v,$(POINTING_VARIANTS),$(POINTING_SEEDS_$(v):%=runs/pointing-$(v)-s%))
POINTING_EVALS := $(POINTING_RUNS:%=%/$(EVALUATED))

$(foreach v,$(POINTING_VARIANTS),$(eval $(call SEEDED_RUNS,pointing,$(v),$(POINTING_ARGS_$(v)),$(POINTING_SEEDS_$(v)),pointing)))

# Every seeded run of the studies above, on TEST at beam 3.
$(SEED_EVALS) $(POOL_EVALS) $(SHORT_EVALS) $(POINTING_EVALS): runs/%/$(EVALUATED): runs/%/.trained
	$(call STAGE,evaluate $*,$(PY) eval.py --checkpoint runs/$*/best.pt --beam-size 3)
	touch $@

POINTING_BASELINES := soft:demo-attention:attention hard:hard-attention:hard transformer:demo-transformer:transformer
$(REPORTS)/pointing/report.md: runs/demo-attention/$(EVALUATED) runs/hard-attention/$(EVALUATED) \
		runs/demo-transformer/$(EVALUATED) $(foreach d,attention hard transformer,$(SEEDS:%=runs/seeds-$(d)-s%/$(EVALUATED))) \
		$(POINTING_EVALS) $(COMPARE_CODE)
	$(call STAGE,pointing: compare,$(PY) compare.py \
		$(foreach b,$(POINTING_BASELINES),--group $(word 1,$(subst :, ,$(b))) runs/$(word 2,$(subst :, ,$(b))) \
			$(SEEDS:%=runs/seeds-$(word 3,$(subst :, ,$(b)))-s%)) \
		$(foreach v,$(POINTING_VARIANTS),--group $(v) $(POINTING_SEEDS_$(v):%=runs/pointing-$(v)-s%)) \
		$(foreach v,$(filter-out hard-% tf-%,$(POINTING_VARIANTS)),--pair soft $(v)) \
		$(foreach v,$(filter hard-%,$(POINTING_VARIANTS)),--pair hard $(v)) \
		$(foreach v,$(filter tf-%,$(POINTING_VARIANTS)),--pair transformer $(v)) \
		--pair soft transformer --pair soft-no-ds hard-no-ds --pair after-word-no-ds hard-after-word-no-ds \
		--pair soft hard-no-ds --pair soft hard-after-word-no-ds --pair transformer after-word-no-ds \
		--pair transformer hard-after-word-no-ds --out $(REPORTS)/pointing --beam-size 3)

pointing: install $(REPORTS)/pointing/report.md

# The committed reports (README and docs link to them): every report made again into reports/, and the
# README's picture of the demo's browser where Chromium is installed (make browser).
reports: install
	$(MAKE) demo transformer seeds length-pool short-training pointing study scst hard hard-estimators REPORTS=reports
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
		$(PY) scripts/browser.py reports/demo/report.html --screenshot reports/demo/browser.png \
			--filter x-wrong --x 0 --y 1 --sort diff-desc --word 8; \
	else echo "no Chromium: reports/demo/browser.png left as it was (make browser installs it)"; fi

# The tutorial reads the demo's data and models; its code draws in runs/tutorial/ the figures that
# docs/tutorial.md shows, copied here into docs/tutorial/.
tutorial: demo
	$(PY) scripts/run_docs.py docs/tutorial.md
	cp runs/tutorial/*.png docs/tutorial/

# PyYAML wheels for a GPU machine whose image lacks it: scripts/gpu_bench.sh installs from .wheels/.
gpu-wheels: install
	for v in 3.10 3.11 3.12 3.13; do $(PY) -m pip download -q pyyaml --only-binary=:all: --no-deps \
		--python-version $$v --platform manylinux2014_x86_64 -d .wheels; done

clean:
	rm -rf $(DATA) runs/demo-rnn runs/demo-attention runs/demo-transformer runs/scst-rnn runs/scst-attention runs/hard-attention \
		runs/seeds-* runs/pool-* runs/short-* runs/pointing-* runs/study-* runs/hx-* runs/reports .pytest_cache .ruff_cache
