"""Serve prompts through one vLLM engine with lavakv's plugin, in this process; print what happened as JSON.

Run by tests/test_vllm_plugin.py in a subprocess of its own, since vLLM picks its platform once per
process: ``python tests/vllm_engine_worker.py CONFIG_JSON``. The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its scheduler's block accounting can be read.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def main(config: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["LAVAKV_VLLM"] = "1"
    record = tempfile.mkdtemp(prefix="lavakv-record-")
    os.environ["LAVAKV_VLLM_RECORD"] = record
    import torch
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = LLM(
        model=config["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        block_size=32,
        num_gpu_blocks_override=config["num_blocks"],
        additional_config={"lavakv": config["server"]},
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    refused = []
    for bad in config["bad_requests"]:
        try:
            engine.add_request("bad", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1, extra_args=bad))
            refused.append(None)
        except (ValueError, VLLMValidationError) as error:
            refused.append(str(error))
    held: dict[str, int] = {}
    outputs: dict[str, list[int]] = {}
    for index, request in enumerate(config["requests"]):
        params = SamplingParams(temperature=0, max_tokens=config["new_tokens"], extra_args=request["extra_args"])
        engine.add_request(str(index), {"prompt_token_ids": request["ids"]}, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        for running in scheduler.running:
            if running.num_output_tokens >= 1:
                blocks = sum(1 for block in manager.req_to_blocks.get(running.request_id, []) if not block.is_null)
                external = running.request_id.rsplit("-", 1)[0]  # vLLM appends a suffix to each request's id
                held[external] = max(held.get(external, 0), blocks)
    kept = {}
    for name in os.listdir(record):
        saved = torch.load(os.path.join(record, name))
        kept[str(saved["prompt_tokens"])] = saved["kept_positions"]
    return {
        "refused": refused,
        "outputs": [outputs.get(str(index)) for index in range(len(config["requests"]))],
        "held_blocks": [held.get(str(index)) for index in range(len(config["requests"]))],
        "kept_by_prompt_tokens": kept,
        "free_blocks_before": free_before,
        "free_blocks_after": pool.get_num_free_blocks(),
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))))
