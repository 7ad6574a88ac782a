# Sourced at the start of every device call: wheels once, model pieces into ~/m, assembled when complete.
export PYTHONPATH=$PWD:$HOME/site MONTESSORI_GGUF_DIR=$HOME/m MONTESSORI_CACHE=$HOME/cache PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The image's transformers (5.17) stays the default: it is the declared floor, which `pytest -m gpu`
# runs on. A newer one (Gemma-3's tokenizer needs >= 5.18) goes to ~/tf, for commands that put it first:
#   PYTHONPATH=$HOME/tf:$PYTHONPATH python experiments/paper_shape.py ...
if [ ! -f $HOME/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $HOME/site \
    $(ls .whl/*.whl | grep -v /transformers-) && touch $HOME/site/.ok || echo "WHEELS FAILED"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $HOME/tf .whl/transformers-*.whl \
    || echo "TRANSFORMERS WHEEL FAILED"
fi
mkdir -p $HOME/m ../shared && cp -rn .gpu/data ../shared/ 2>/dev/null
for f in .carry/m.0[0-9]; do [ -f "$f" ] && cp "$f" $HOME/m/; done
# The pieces are one stream: SmolLM2's GGUF (98362432 bytes) then Gemma's; each file is cut out once its
# bytes are all there and kept only if its sha256 matches; it appears under its name only then, whole
# (bench/carry/paper_shape.sh waits for the student's file to appear).
n=$(ls $HOME/m/m.0* 2>/dev/null | wc -l)
S=$HOME/m/SmolLM2-135M-Instruct.Q4_1.gguf G=$HOME/m/gemma-3-270m-q4_k_m.gguf
if [ ! -f $S ] && [ "$n" -ge 2 ]; then
  cat $HOME/m/m.00 $HOME/m/m.01 | head -c 98362432 > $S.part
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $S.part" | sha256sum -c && mv $S.part $S || rm -f $S.part
fi
if [ ! -f $G ] && [ "$n" -eq 6 ]; then
  cat $HOME/m/m.0* | tail -c +98362433 > $G.part
  echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $G.part" | sha256sum -c && mv $G.part $G || rm -f $G.part
fi
echo "pieces: $(ls $HOME/m | tr '\n' ' ')"
python3 -c "import torch, transformers, trl, peft, accelerate, datasets; print('versions', torch.__version__, transformers.__version__, trl.__version__, peft.__version__, accelerate.__version__, datasets.__version__, torch.cuda.get_device_name(0))"
PYTHONPATH=$HOME/tf:$PYTHONPATH python3 -c "import transformers; print('~/tf transformers', transformers.__version__)"
