"""Benchmarks: latency per component and backend (`latency.py`), restoration quality on the
classic JPEG test sets (`quality.py`), and the one-shot GPU check (`gpu_check.sh`)."""
