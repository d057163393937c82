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
PIP_FLAGS := --no-warn-conflicts

.PHONY: setup test lint bench bench-peers clean

setup:
	$(PYTHON) -m venv $(VENV)
	@# torchrec declares the CUDA fbgemm-gpu; it is installed without its dependencies next to the CPU (or CUDA)
	@# build of fbgemm, so pip's own post-install conflict warning is off (--no-warn-conflicts) and `pip check`
	@# below says in our words what is expected, failing on anything else.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "== CUDA machine: CUDA builds of torch, fbgemm-gpu, onnxruntime-gpu"; \
	  $(PIP) install $(PIP_FLAGS) torch==$(TORCH_VERSION) fbgemm-gpu==$(FBGEMM_VERSION) && \
	  $(PIP) install $(PIP_FLAGS) --no-deps torchrec==$(TORCHREC_VERSION) && \
	  $(PIP) install $(PIP_FLAGS) $(TORCHREC_DEPS) && \
	  $(PIP) install $(PIP_FLAGS) -e ".[dev,serve,rl,gpu]" ; \
	else \
	  echo "== CPU machine: torch $(TORCH_VERSION) CPU wheel, fbgemm-gpu-cpu"; \
	  $(PIP) install $(PIP_FLAGS) torch==$(TORCH_VERSION) fbgemm-gpu-cpu==$(FBGEMM_VERSION) && \
	  $(PIP) install $(PIP_FLAGS) --no-deps torchrec==$(TORCHREC_VERSION) && \
	  $(PIP) install $(PIP_FLAGS) $(TORCHREC_DEPS) && \
	  $(PIP) install $(PIP_FLAGS) -e ".[dev,serve,rl]" ; \
	fi
	@out="$$($(PIP) check 2>&1)"; \
	rest="$$(printf '%s\n' "$$out" | grep -v -e '^torchrec [^ ]* requires fbgemm-gpu, which is not installed' \
	  -e '^No broken requirements found')"; \
	if [ -n "$$rest" ]; then printf 'pip check: broken requirements:\n%s\n' "$$rest"; exit 1; fi; \
	if printf '%s\n' "$$out" | grep -q '^torchrec'; then \
	  echo "== dependencies consistent: torchrec's declared fbgemm-gpu is provided by fbgemm-gpu-cpu $(FBGEMM_VERSION) (same fbgemm_gpu module)"; \
	else echo "== dependencies consistent"; fi
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

bench-peers:
	@# Peer libraries for side-by-side benchmarks, kept out of the project venv: benchmarks/throughput.py
	@# appends benchmarks/.peers to the END of sys.path, so the venv's packages always win. --no-deps
	@# everywhere: the venv already has torch, numpy, tqdm, python-dateutil and tzdata; the rest of what
	@# `import torch_rechub` reaches (its trainers import sklearn, sklearn pulls scipy, joblib,
	@# threadpoolctl and narwhals; pandas) is listed here.
	$(PIP) install --no-deps --target benchmarks/.peers torch-rechub==0.9.0 \
	  pandas==3.1.1 scikit-learn==1.9.1 scipy==1.17.1 joblib==1.6.0 threadpoolctl==3.8.0 narwhals==2.28.0
	@# LibMTL (benchmarks/gradient_overhead.py): --no-deps because it declares torchvision, which has no CPU
	@# build here and would pull a CUDA torch; the benchmark stubs `torchvision.models.utils` (reached only by
	@# LibMTL/model/resnet.py) before `import LibMTL`. Its CAGrad imports scipy, installed by the line above.
	$(PIP) install --no-deps --target benchmarks/.peers LibMTL==1.1.5
	@# Stable-Baselines3 (benchmarks/rl_speed.py): what its SAC imports (gymnasium, numpy, torch, cloudpickle,
	@# matplotlib) is in the venv already; it imports pandas only to read its CSV logs, which the benchmark does not.
	$(PIP) install --no-deps --target benchmarks/.peers stable-baselines3==2.9.0
	@# MLServer (benchmarks/serving.py) runs as its own server process, so it gets its own venv: its
	@# fastapi/pydantic/uvicorn stack never meets the project's packages.
	python3 -m venv benchmarks/.mlserver-venv
	@# uvloop < 0.22: with 0.23, MLServer 1.7.1's parallel inference workers die at start ("no current event loop").
	benchmarks/.mlserver-venv/bin/pip install mlserver==1.7.1 onnxruntime==1.31.1 "uvloop<0.22"

clean:
	rm -rf $(VENV) outputs multirun *.egg-info
