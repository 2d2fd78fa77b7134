import sys, time, torch
from langchain_gemma_mtp.embedded import embedded_model_dir, EMBEDDED_ASSISTANT_DIR
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.runtime import ChatRuntime
from benchmarks.agent_bench import run_streams, prompt_ids, WORKLOADS, CONCURRENT
torch.set_num_threads(2)
drafter = sys.argv[1]; n = int(sys.argv[2])
kw = dict(assistant=str(EMBEDDED_ASSISTANT_DIR)) if drafter in ("hybrid","mtp") else {}
engine = Engine.from_pretrained(str(embedded_model_dir()), drafter=drafter, dtype="bfloat16", **kw)
rt = ChatRuntime(engine)
ids = [prompt_ids(rt, WORKLOADS[w]["messages"]) for w in CONCURRENT]
prompts = (ids * 8)[:n]
run_streams(engine, prompts[:1], 8, False)
for conc in (False, True, False, True):
    r = run_streams(engine, prompts, 64, conc)
    print(drafter, n, "concurrent" if conc else "sequential", round(r["tok_s"],1), round(r["wall"],2), flush=True)
