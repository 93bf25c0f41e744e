"""BoolQ: conversion to the prompt/completion format and accuracy evaluation."""
