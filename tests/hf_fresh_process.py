"""Run exported SepLLM models in stock transformers, in a process that cannot import our package.

    python -I tests/hf_fresh_process.py JOBS.json RESULTS.pt

JOBS.json lists {"dir", "tokens" [[...]], "prompt" [...], "new_tokens", "plain", "readme", "remote"}; for
each export this loads it with trust_remote_code (without it when "remote" is false), records
transformers' load report (missing / unexpected / mismatched keys), computes fp32 logits of ``tokens``,
generates greedily
from ``prompt`` with the export's default cache and with an explicit ``model.sepllm_cache()``
(recording its length after every step); with ``plain``, the logits of the same directory loaded
without remote code; with ``readme``, the README's example on that text. Results go to RESULTS.pt
(torch.save of a dict per directory). Used by test_hf_sepllm.py and test_hf_export_matrix.py.
"""
import json
import sys


class NoOurPackage:
    """Import hook: the exported code must work without the megatron package installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            raise ImportError(f"{name} is not available in this process")


def load(transformers, torch, directory, remote):
    """(model, its load report as plain lists)."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=remote, dtype=torch.float32, output_loading_info=True)
    report = {key: sorted(str(k) for k in info.get(key) or ())
              for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    return model.eval(), report


def run_job(job, transformers, torch):
    model, report = load(transformers, torch, job["dir"], job.get("remote", True))
    out = {"class": type(model).__name__, "module": type(model).__module__, "load_report": report}
    tokens = torch.tensor(job["tokens"])
    with torch.no_grad():
        out["logits"] = model(tokens).logits
    if job.get("new_tokens"):
        prompt = torch.tensor([job["prompt"]])
        settings = dict(max_new_tokens=job["new_tokens"], do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out["greedy_default"] = model.generate(prompt, **settings)[0, prompt.shape[1]:].tolist()
            cache = model.sepllm_cache()
            lengths = []

            def record(input_ids, scores, **kwargs):
                lengths.append(cache.length)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

            criteria = transformers.StoppingCriteriaList([record])
            out["greedy_cache"] = model.generate(prompt, past_key_values=cache, stopping_criteria=criteria,
                                                 **settings)[0, prompt.shape[1]:].tolist()
        out.update(cache_lengths=lengths, cache_size=cache.budget.cache_size, compressions=cache.compressions,
                   kept_token_ids=cache.kept_token_ids())
    if job.get("readme"):  # README "Using a SepLLM model in transformers", as written there
        tok = transformers.AutoTokenizer.from_pretrained(job["dir"])
        inputs = tok(job["readme"], return_tensors="pt")
        out["readme_prompt"] = inputs["input_ids"][0].tolist()
        out["readme_generated"] = model.generate(**inputs, max_new_tokens=job["new_tokens"])[0].tolist()
    if job.get("plain"):
        plain, out["plain_load_report"] = load(transformers, torch, job["dir"], False)
        out["plain_class"] = type(plain).__name__
        with torch.no_grad():
            out["plain_logits"] = plain(tokens).logits
    return out


def main(jobs_path, results_path):
    sys.meta_path.insert(0, NoOurPackage())
    import torch
    import transformers

    jobs = json.loads(open(jobs_path).read())
    results = {job["dir"]: run_job(job, transformers, torch) for job in jobs}
    results["__megatron_imported__"] = any(m == "megatron" or m.startswith("megatron.") for m in sys.modules)
    results["__sys_path__"] = list(sys.path)
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
