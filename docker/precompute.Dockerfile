# Stage one: teacher precompute on GPUs, on top of the official vLLM image (brings CUDA torch + vLLM).
#   docker build -f docker/precompute.Dockerfile -t logitcache-precompute .
#   docker run --gpus all -v $PWD/caches:/caches -v $HOME/.cache/huggingface:/root/.cache/huggingface \
#     logitcache-precompute precompute --teacher Qwen/Qwen2.5-7B-Instruct --data /caches/data.jsonl \
#     --prompt-field prompt --response-field response --out /caches/qwen7b-top32 --engine vllm
FROM vllm/vllm-openai:v0.11.0

WORKDIR /opt/logitcache
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY storage ./storage
# vLLM's image already has torch, transformers and vllm; this adds logitcache and its light deps.
RUN pip install --no-cache-dir ".[s3,ray]"

ENTRYPOINT ["logitcache"]
CMD ["precompute", "--help"]
