# Included by the Makefile (`-include bench/bench.mk`): the benchmark of issue 4.
# `make bench`: tandem against the in-process baseline, side by side, in one run (a few minutes);
# writes bench/out/results.json, bench/out/bench.png, bench/out/profile-api.txt and prints the table.
# `make bench-smoke`: the same in seconds with small numbers (CI), and bench/slots.py; no timing is asserted anywhere.
bench: $(BIN)/.installed
	$(BIN)/pip install -q 'matplotlib>=3.8' 'py-spy>=0.3.14'
	$(BIN)/python -m bench.run

bench-smoke: $(BIN)/.installed
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q 'matplotlib>=3.8'
	$(BIN)/python -m bench.run --smoke
	$(BIN)/python -m bench.slots --streams 20 --seconds 1
