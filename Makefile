# gkdc: the three commands a newcomer needs.
.PHONY: setup test test-all demo bench

setup:            ## create .venv and install gkdc (CPU torch where there is no GPU)
	bash scripts/setup.sh

test:             ## the test suite (real DeepSpeed on CPU; slow end-to-end demo excluded)
	.venv/bin/python -m pytest -m "not slow" -q

test-all:         ## everything, including the slow end-to-end demo
	.venv/bin/python -m pytest -q

demo:             ## check, plan and run the built-in example (no GPU, no download)
	bash examples/demo.sh

bench:            ## all benchmarks; writes docs/benchmarks.md
	bash bench/run_all
