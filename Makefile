# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cacnb-installed
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
# make lab: the interface JupyterLab listens on (localhost; IP=0.0.0.0 for every interface) and its port
IP     ?= localhost
PORT   ?= 8888

.PHONY: install demo test lab data sweep pretrain clean-demo gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[notebooks,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (cacnb)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

## make demo: write the synthetic dataset if missing, then execute every notebook into runs/demo/ on CPU
demo: install
	$(BIN)/python -m cacnb.demo --out runs/demo

## make test: the whole test suite on two pytest-xdist workers (non-zero exit on any failure; measured times:
## benchmarks/RESULTS.md, "The test suite"). TEST_ARGS="-n 0" runs it in one process.
TEST_ARGS ?= -n 2
test: install
	$(BIN)/python -m pytest -q $(TEST_ARGS) --durations=15 tests

## make sweep: the README's study (5 seeds x supervised/semi/full, two runs side by side; the pretrained backbone
## is built first when missing; see the README for its measured time), papermill runs of notebook 03 into
## runs/sweep/. SEEDS=0,1,2 runs 3 seeds; ABLATE="--ablate loss.directional=false" adds rows (16-19 min per row
## of 5 seeds, measured on an idle 2-core machine on 2026-12-08)
SEEDS ?= 0,1,2,3,4
ABLATE ?=
sweep: install
	$(BIN)/python -m cacnb.sweep --config synthetic_context --modes supervised,semi,full --seeds $(SEEDS) --jobs 2 \
	    $(ABLATE) --out runs/sweep

## make pretrain: the benchmark's pretrained backbone (this world's ImageNet, python -m cacnb.pretrain) at
## pretrained/synthetic_resnet18.pth; kept when current. make sweep builds it when missing, make demo a short one
pretrain: install
	$(BIN)/python -m cacnb.pretrain

## make lab: JupyterLab on the project root (notebooks/, and runs/ with the executed demo notebooks) without opening
## a browser (works as root); open the URL it prints,
## through an SSH tunnel on a remote machine: ssh -N -L 8888:localhost:8888 user@host
lab: install
	$(BIN)/jupyter lab --notebook-dir=. --no-browser --ip=$(IP) --port=$(PORT) $(ROOT_FLAG)

## make gpu-check: the CUDA tests, step / loss benchmarks and NCCL run in one time-bounded command (about 8 minutes;
## without CUDA: the CPU parts, under a minute), summary in runs/gpu_check/<time>/. It installs nothing: it uses
## .venv when there is one, else $(PYTHON) as the machine has it (a GPU machine's own PyTorch)
GPU_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

data: install
	$(BIN)/python -m cacnb.data.synthetic --root data/synthetic --num-test 40

clean-demo:
	rm -rf runs/demo
