"""flowrl.train"""
