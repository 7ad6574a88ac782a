# Probe accuracy by quartile of the pair's influence gap (rank rule), per seed: do wider gaps mean more learnable pairs?
import sys, json, numpy as np
from pathlib import Path
sys.path.insert(0,"/work/main"); sys.path.insert(0,"/work/main/experiments")
import dpo_study as ds
from montessori.config import load_preset
from scipy.sparse import vstack
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
cfg = load_preset("paper-shape")
vec = HashingVectorizer(ngram_range=(1, 2), n_features=2 ** 16, alternate_sign=False, norm="l2")
out = []
for s in (0, 1, 2):
    files = ds.load_round(Path(sys.argv[1]) / f"seed-{s}" / "montessori")
    prefs = ds.variant_pairs(files, cfg.preferences, ["rank"])["rank"]
    gap = np.array([p.chosen_influence - p.rejected_influence for p in prefs])
    x = vec.transform([p.chosen for p in prefs]) - vec.transform([p.rejected for p in prefs])
    pred = np.zeros(len(prefs), bool)
    for tr, te in GroupKFold(5).split(x, groups=[p.prompt_id for p in prefs]):
        m = LogisticRegression(max_iter=1000).fit(vstack([x[tr], -x[tr]]), np.r_[np.ones(len(tr)), np.zeros(len(tr))])
        pred[te] = m.decision_function(x[te]) > 0
    bins = np.digitize(gap, np.quantile(gap, [0.25, 0.5, 0.75]))
    out.append({"seed": s, "by_gap_quartile": [float(pred[bins == b].mean()) for b in range(4)], "all": float(pred.mean())})
    print(json.dumps(out[-1]))
json.dump(out, open(sys.argv[2], "w"), indent=1)
