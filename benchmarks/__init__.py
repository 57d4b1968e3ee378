"""Benchmarks of nn_blocksparse; run each as `python -m benchmarks.<name>` from the repository root.

- `bench_kernel`: the GPU kernel against cuBLAS, torch BSR and resizing (`--quick`: a CPU smoke run);
- `bench_e2e`: a pruned BERT-base end to end, dense vs resize vs block-sparse vs hybrid;
- `bench_cpu`: the CPU kernel path and pruned MiniLM / BERT-base end to end on CPU;
- `tune_kernel`: measures the best launch configuration per problem, writes a tuned table where `--out`
  says (the library takes it through `NN_BLOCKSPARSE_TUNED_CONFIGS`);
- `run_all`: everything this machine can run, into `benchmarks/results/`.

Every CSV starts with `# key: value` lines recording the environment (see `common`).
"""
