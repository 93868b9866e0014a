"""Evaluation: teacher-forced metrics (metrics.py); generation and ROUGE-L land here too."""
