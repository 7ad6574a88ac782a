# Does the judge tell a real answer from an echo of the prompt? Reference (human) answer vs the untrained
# base student's greedy answer, first 8 held-out prompts, both orders.
import json, sys
sys.path.insert(0, "/work/main")
from montessori.evaluation.judge import make_judge
from montessori.evaluation.winrate import Judgement, win_rate
from montessori.readers import read_pairs
pairs = read_pairs("/work/shared/data/self_instruct_user_oriented.jsonl", limit=8).records
untrained = {json.loads(l)["id"]: json.loads(l)["answers"][0] for l in open("/work/main/runs/paper-h200/answers/untrained.jsonl")}
judge = make_judge("qwen2.5-coder-1.5b", device="cpu")
js = []
for p in pairs:
    a, b = p.response, untrained[p.id]
    js.append(Judgement(p.id, judge.prefer(p.instruction, a, b), judge.prefer(p.instruction, b, a), len(a), len(b)))
    print(p.id, round(js[-1].a_first, 3), round(js[-1].b_first, 3), flush=True)
print(json.dumps(win_rate(js, samples=500)))
