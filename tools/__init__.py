"""Benchmarks and measurements of lowrank_compile; not part of the installed package.

Each tool is a script, ``python tools/<tool>.py --help``, and, from the repository root, a module too,
``python -m tools.<tool>``. What they share comes from the package: ``lowrank_compile.measure`` (memory and
time). Tools that build on another tool import it as a sibling (step_budget.py and profile_step.py use
bench.py's models and configurations; minilm_step.py convergence.py's MiniLM weights): ``from . import bench``
as a module, ``import bench`` as a script, where Python puts tools/ first on sys.path. bench.py's models stay
in tools/ because tools/gpu_suite.sh runs this tree's bench.py against an older lowrank_compile too.
"""
