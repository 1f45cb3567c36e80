#!/usr/bin/env node
// A `solc` look-alike for py-solc-x, backed by solc-js from npm (no native binary can be downloaded
// here). It answers the two calls py-solc-x makes, `--version` and `--standard-json` (JSON on stdin,
// JSON alone on stdout), and resolves imports from --base-path and its node_modules, refusing any
// file outside --allow-paths. The stock `solcjs` CLI prints a line before its JSON and rejects
// --allow-paths, so py-solc-x cannot drive it directly.
'use strict';
const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');

function option(name) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : undefined;
}

const basePath = path.resolve(option('--base-path') || process.cwd());
const allowPaths = (option('--allow-paths') || basePath)
  .split(',')
  .filter(Boolean)
  .map((p) => path.resolve(p));

let solc;
try {
  solc = createRequire(path.join(basePath, 'package.json'))('solc');
} catch (err) {
  process.stderr.write(`solc-js is not installed under ${basePath}/node_modules: run \`npm ci\` there\n`);
  process.exit(3);
}

if (process.argv.includes('--version')) {
  process.stdout.write(`solc, the solidity compiler commandline interface\nVersion: ${solc.version()}\n`);
  process.exit(0);
}

if (!process.argv.includes('--standard-json')) {
  process.stderr.write('only --version and --standard-json are supported\n');
  process.exit(2);
}

function allowed(file) {
  return allowPaths.some((root) => file === root || file.startsWith(root + path.sep));
}

function findImports(unitName) {
  for (const candidate of [path.join(basePath, unitName), path.join(basePath, 'node_modules', unitName)]) {
    const file = path.resolve(candidate);
    if (!allowed(file)) continue;
    if (fs.existsSync(file)) return { contents: fs.readFileSync(file, 'utf8') };
  }
  return { error: `File not found or outside the allowed paths: ${unitName}` };
}

const input = fs.readFileSync(0, 'utf8');
process.stdout.write(solc.compile(input, { import: findImports }));
