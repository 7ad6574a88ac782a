# Sourced at the start of every device call: wheels once, model pieces into ~/m, each model assembled once
# its bytes are all there (bench/carry/make_kit.sh says what travels in which call).
export PYTHONPATH=$PWD:$HOME/site MONTESSORI_GGUF_DIR=$HOME/m MONTESSORI_CACHE=$HOME/cache PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The image's transformers (5.17) stays the default: it is the declared floor, which `pytest -m gpu`
# runs on. A newer one (Gemma-3's tokenizer needs >= 5.18) goes to ~/tf, for commands that put it first:
#   PYTHONPATH=$HOME/tf:$PYTHONPATH python experiments/paper_shape.py ...
if [ ! -f $HOME/site/.ok ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $HOME/site \
    $(ls .whl/*.whl | grep -v /transformers-) && touch $HOME/site/.ok || echo "WHEELS FAILED"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $HOME/tf .whl/transformers-*.whl \
    || echo "TRANSFORMERS WHEEL FAILED"
fi
mkdir -p $HOME/m $HOME/shared && { [ -d .gpudata ] && cp -rn .gpudata/data $HOME/shared/ 2>/dev/null; true; }
for f in .carry/m.[0-9][0-9]; do [ -f "$f" ] && cp "$f" $HOME/m/; done
# The pieces are one stream, the models of .gpu/models.txt in order. A model is cut out once every piece
# up to its last byte is here (pieces arrive in order), and kept only if its sha256 matches.
have=0; n=0
while [ -f $HOME/m/m.$(printf %02d $n) ]; do have=$((have + $(stat -c %s $HOME/m/m.$(printf %02d $n)))); n=$((n + 1)); done
offset=0
while read -r name size sha; do
  if [ ! -f $HOME/m/$name ] && [ $((offset + size)) -le $have ]; then
    cat $(ls $HOME/m/m.[0-9][0-9] | sort) | tail -c +$((offset + 1)) | head -c $size > $HOME/m/$name.part
    echo "$sha  $HOME/m/$name.part" | sha256sum -c --quiet && mv $HOME/m/$name.part $HOME/m/$name || rm -f $HOME/m/$name.part
  fi
  offset=$((offset + size))
done < .gpu/models.txt
echo "pieces: $n ($have bytes); models: $(cd $HOME/m && ls *.gguf 2>/dev/null | tr '\n' ' ')"
if [ $n -le 1 ]; then
  python3 -c "import torch, transformers, trl, peft, accelerate, datasets; print('versions', torch.__version__, transformers.__version__, trl.__version__, peft.__version__, accelerate.__version__, datasets.__version__, torch.cuda.get_device_name(0))"
  PYTHONPATH=$HOME/tf:$PYTHONPATH python3 -c "import transformers; print('~/tf transformers', transformers.__version__)"
fi
