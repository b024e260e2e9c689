# Stage two: student training from a cache, on top of the official PyTorch image. No vLLM needed.
#   docker build -f docker/train.Dockerfile -t logitcache-train .
#   docker run --gpus all -v $PWD/caches:/caches logitcache-train \
#     train --student Qwen/Qwen2.5-0.5B --cache /caches/qwen7b-top32 --loss bild --out /caches/student
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

WORKDIR /opt/logitcache
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY storage ./storage
# What train's documented flags need: peft (--lora-r), tensorboard and wandb (--report-to), deepspeed (--deepspeed).
RUN pip install --no-cache-dir ".[s3,lora,train-extras]"

ENTRYPOINT ["logitcache"]
CMD ["train", "--help"]
