# mtlib: `make setup` then `make test`.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python

TORCH_VERSION    := 2.13.0
FBGEMM_VERSION   := 1.8.0
TORCHREC_VERSION := 1.8.0
# torchrec's own needs, less fbgemm-gpu (installed separately in the CPU or CUDA flavour).
TORCHREC_DEPS := tensordict==0.15.3 torchmetrics==1.0.3 pyre-extensions==0.0.32 iopath tqdm

.PHONY: setup test lint bench clean

setup:
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "== CUDA machine: CUDA builds of torch, fbgemm-gpu, onnxruntime-gpu"; \
	  $(PIP) install torch==$(TORCH_VERSION) fbgemm-gpu==$(FBGEMM_VERSION) && \
	  $(PIP) install --no-deps torchrec==$(TORCHREC_VERSION) && \
	  $(PIP) install $(TORCHREC_DEPS) && \
	  $(PIP) install -e ".[dev,serve,rl,gpu]" ; \
	else \
	  echo "== CPU machine: torch $(TORCH_VERSION) CPU wheel, fbgemm-gpu-cpu"; \
	  $(PIP) install torch==$(TORCH_VERSION) fbgemm-gpu-cpu==$(FBGEMM_VERSION) && \
	  $(PIP) install --no-deps torchrec==$(TORCHREC_VERSION) && \
	  $(PIP) install $(TORCHREC_DEPS) && \
	  $(PIP) install -e ".[dev,serve,rl]" ; \
	fi
	$(PY) -c "import torch, torchrec, fbgemm_gpu, mtl, mtrec; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"

test:
	$(VENV)/bin/ruff check mtl mtrec mtrl serving tests benchmarks
	$(VENV)/bin/pytest -q

lint:
	$(VENV)/bin/ruff check mtl mtrec mtrl serving tests benchmarks

bench:
	$(PY) benchmarks/mmoe_synthetic.py --quick
	$(PY) benchmarks/census.py --quick
	$(PY) benchmarks/throughput.py --quick

clean:
	rm -rf $(VENV) outputs multirun *.egg-info
