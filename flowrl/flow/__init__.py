"""flowrl.flow"""
