"""``vllm.outputs`` at hpcinfer's path: the result types of generate, chat and pooling."""
from hpcinfer.engine.outputs import (ClassificationOutput, ClassificationRequestOutput,
                                     CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput,
                                     Logprob, PoolingOutput, PoolingRequestOutput,
                                     RequestMetrics, RequestOutput, ScoringOutput,
                                     ScoringRequestOutput)

__all__ = ["ClassificationOutput", "ClassificationRequestOutput", "CompletionOutput",
           "EmbeddingOutput", "EmbeddingRequestOutput", "Logprob", "PoolingOutput",
           "PoolingRequestOutput", "RequestMetrics", "RequestOutput", "ScoringOutput",
           "ScoringRequestOutput"]
