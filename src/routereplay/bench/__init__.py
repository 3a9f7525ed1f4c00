"""The measurements `routereplay bench` runs, each a function that returns JSON data and
a `render` that returns the table people read.

  router   what the controller adds to one router call, next to native selection
           (`routereplay bench router`, the default; benchmarks/bench_controller.py)
  ingest   a step of vLLM server payloads to one trainer rank's replay targets, next to
           a floor and a verl-style batch (`routereplay bench ingest`;
           benchmarks/bench_ingest.py)
"""
