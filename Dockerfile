# Minimal CPU image: the server with the scikit-learn and XGBoost runtimes.
#   docker build -t mmserver .
#   docker run -p 8080:8080 -v $PWD/model-repo:/mnt/models mmserver
FROM python:3.11-slim
WORKDIR /opt/mmserver
COPY pyproject.toml README.md ./
COPY mmserver ./mmserver
COPY runtimes ./runtimes
RUN pip install --no-cache-dir . ./runtimes/sklearn ./runtimes/xgboost
USER 1000
EXPOSE 8080
ENTRYPOINT ["mmserver", "serve"]
CMD ["/mnt/models", "--host", "0.0.0.0", "--port", "8080"]
