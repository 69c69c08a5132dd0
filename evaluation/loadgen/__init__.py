"""Load generator for any OpenAI-compatible server (/v1/completions or /v1/chat/completions).

Streams every request and times it on the client: TTFT (request sent -> first generated chunk),
ITL (between generated chunks), TPOT ((latency - TTFT) / (output tokens - 1)) and end-to-end
latency (request sent -> last generated chunk), the definitions `vllm bench serve` uses, so the
two can be compared (evaluation.benchmarks.vllm_bench). Output tokens come from the streamed
usage (stream_options.include_usage) when the server sends it, else one per generated chunk.

Profiles (configs.evaluation.LoadProfile): synchronous (one request at a time), a concurrency
sweep (closed loop: N requests always in flight), or Poisson arrivals at a fixed rate. Each level
sends its warm-up requests first and leaves them out of the figures.

    slipway loadgen run --base-url http://127.0.0.1:8000 --model m --out DIR
    slipway loadgen compare --base-url ... --model m --tokenizer DIR --out DIR

Modules, each imported from where a name is defined:
  report      the report types, the timings of one stream and the summary of a level (pure)
  client      sending the requests: closed-loop and Poisson drivers, a profile run, its files
  plot        the report's figure
  background  synthetic Poisson load on a thread of its own, for the rollout
"""
