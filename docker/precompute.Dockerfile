# Stage one: teacher precompute on GPUs, on top of the official vLLM image (brings CUDA torch + vLLM).
#   docker build -f docker/precompute.Dockerfile -t logitcache-precompute .
#   docker run --gpus all -v $PWD/caches:/caches -v $HOME/.cache/huggingface:/root/.cache/huggingface \
#     logitcache-precompute precompute --teacher Qwen/Qwen2.5-7B-Instruct --data /caches/data.jsonl \
#     --prompt-field prompt --response-field response --out /caches/qwen7b-top32 --engine vllm
# The tag is the vllm floor of pyproject.toml (the release whose pooling/logprobs APIs the engine calls).
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/logitcache
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY storage ./storage
# vLLM's image already has torch, transformers and vllm; this adds logitcache and its light deps. The
# constraints file pins the image's own torch/transformers/vllm, so pip fails loudly instead of silently
# replacing vLLM's transformers if logitcache ever asked for another one.
RUN pip freeze | grep -iE '^(torch|transformers|vllm|tokenizers)==' > /tmp/image-pins.txt \
    && pip install --no-cache-dir -c /tmp/image-pins.txt ".[s3,ray]"

ENTRYPOINT ["logitcache"]
CMD ["precompute", "--help"]
