.PHONY: install test lint format bench

install:
	python -m pip install torch==2.13.0
	python -m pip install -e ".[dev]"

test:
	python -m pytest

lint:
	ruff check .
	ruff format --check .
	mypy
	lint-imports

format:
	ruff format .
	ruff check --fix .

bench:
	mkdir -p bench-results
	td3drive bench learner --json bench-results/learner.json
