# What does the judge (Qwen2.5-Coder-1.5B-Instruct, CPU) answer to the pairwise prompt? Greedy verdict and its
# top next tokens, human answer vs the untrained student's prompt echo, both orders (prompts 1 and 2).
import sys, torch, time, json
sys.path.insert(0, "/work/main")
from montessori.models import load_model
from montessori.evaluation.judge import pairwise_messages
from montessori.readers import read_pairs
m, tok = load_model("qwen2.5-coder-1.5b", device="cpu", dtype="float32")
pairs = read_pairs("/work/shared/data/self_instruct_user_oriented.jsonl", limit=3).records
un = {json.loads(l)["id"]: json.loads(l)["answers"][0] for l in open("/work/main/runs/paper-h200/answers/untrained.jsonl")}
for p in pairs[1:3]:
  for a,b,tag in ((p.response, un[p.id], "human first"), (un[p.id], p.response, "echo first")):
    ids = tok.apply_chat_template(pairwise_messages(p.instruction, a, b), add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids): ids = ids["input_ids"]
    out = m.generate(ids, max_new_tokens=25, do_sample=False)
    with torch.no_grad(): lp = torch.log_softmax(m(ids).logits[0,-1].float(),-1)
    top = lp.topk(4)
    print(tag, ids.shape[1], repr(tok.decode(out[0, ids.shape[1]:])), [(tok.decode([i]), round(v.item(),2)) for v,i in zip(top.values, top.indices)], flush=True)
  print("human:", repr(p.response[:150])); print("echo:", repr(un[p.id][:150]))
