"""flowrl.llm"""
