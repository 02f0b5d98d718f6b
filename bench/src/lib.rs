//! Shared set-up for hvbench's benchmarks (see benches/). The benchmarks measure the
//! harness itself, not hypervisors: the suite's own figures come from `hvbench run`.
