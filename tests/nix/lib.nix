# A small stand-in for nixpkgs' lib, enough to evaluate nix/module.nix offline (nixpkgs cannot be
# fetched in CI). It follows the real module system where the module relies on it: options and
# types are checked, unknown options are refused, mkIf is pushed down to the definitions without
# forcing its condition early, mkDefault/mkForce priorities apply, submodules are evaluated as
# nested module sets. Error texts match nixpkgs' ("does not exist", "is not of type").
# tests/nix/eval.nix uses the real lib instead when NIXPKGS_LIB names one.
let
  inherit (builtins)
    all any attrNames concatMap concatStringsSep elem filter foldl' genList head isAttrs isBool
    isFunction isInt isList isPath isString length listToAttrs map match replaceStrings substring
    stringLength tail toJSON typeOf
    ;

  hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;
  removePrefix = pre: s:
    if hasPrefix pre s then substring (stringLength pre) (stringLength s - stringLength pre) s else s;
  optional = c: x: if c then [ x ] else [ ];
  optionals = c: xs: if c then xs else [ ];
  optionalAttrs = c: as: if c then as else { };
  optionalString = c: s: if c then s else "";
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
  escapeShellArg = a:
    let s = toString a; in
    if match "[[:alnum:],._+:@%/-]+" s == null then "'${replaceStrings [ "'" ] [ "'\\''" ] s}'" else s;
  escapeShellArgs = xs: concatStringsSep " " (map escapeShellArg xs);
  showOption = concatStringsSep ".";
  showDefs = defs: concatStringsSep "" (map (d: "\n- In `${d.file}': ${showValue d.value}") defs);
  showValue = v:
    if isString v || isInt v || isBool v || v == null || isList v then toJSON v
    else if isPath v then toString v
    else "<${typeOf v}>";

  # --- options and properties -------------------------------------------------------------------
  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: mkOption {
    type = types.bool;
    default = false;
    example = true;
    description = "Whether to enable ${name}.";
  };
  isOption = x: isAttrs x && (x._type or null) == "option";
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkOverride = priority: content: { _type = "override"; inherit priority content; };
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  # A definition value with its mkIf conditions resolved and its priority read off (100 = plain).
  # Returns null when an mkIf is false.
  resolve = v:
    if isAttrs v && (v._type or null) == "if" then (if v.condition then resolve v.content else null)
    else if isAttrs v && (v._type or null) == "override" then
      let r = resolve v.content; in if r == null then null else r // { priority = v.priority; }
    else { value = v; priority = 100; };

  # Keep the definitions that apply and have the highest priority (lowest number).
  applicableDefs = defs:
    let
      resolved = concatMap (d: let r = resolve d.value; in optional (r != null) (d // r)) defs;
      best = foldl' (m: d: if d.priority < m then d.priority else m) 9999 resolved;
    in
    filter (d: d.priority == best) resolved;

  # --- types ------------------------------------------------------------------------------------
  mkOptionType = { name, description ? name, check ? (_: true), merge ? mergeEqualOption }:
    { _type = "option-type"; inherit name description check merge; };

  mergeEqualOption = loc: defs:
    let first = head defs; in
    if all (d: d.value == first.value) defs then first.value
    else throw "The option `${showOption loc}' has conflicting definition values:${showDefs defs}";

  isDerivation = x: isAttrs x && (x.type or null) == "derivation";

  types = rec {
    bool = mkOptionType { name = "bool"; description = "boolean"; check = isBool; };
    int = mkOptionType { name = "int"; description = "signed integer"; check = isInt; };
    str = mkOptionType { name = "str"; description = "string"; check = isString; };
    port = mkOptionType {
      name = "port";
      description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)";
      check = x: isInt x && x >= 0 && x <= 65535;
    };
    ints.positive = mkOptionType {
      name = "positiveInt";
      description = "positive integer, meaning >0";
      check = x: isInt x && x > 0;
    };
    path = mkOptionType {
      name = "path";
      description = "path";
      check = x: isPath x || (isString x && hasPrefix "/" x);
    };
    package = mkOptionType {
      name = "package";
      description = "package";
      check = x: isDerivation x || (isString x && hasPrefix "${builtins.storeDir}/" x);
    };
    strMatching = pattern: mkOptionType {
      name = "strMatching ${toJSON pattern}";
      description = "string matching the pattern ${pattern}";
      check = x: isString x && match pattern x != null;
    };
    enum = values: mkOptionType {
      name = "enum";
      description = "one of ${concatStringsSep ", " (map toJSON values)}";
      check = x: elem x values;
    };
    unspecified = mkOptionType { name = "unspecified"; description = "unspecified value"; merge = mergeAnything; };
    anything = mkOptionType { name = "anything"; description = "anything"; merge = mergeAnything; };
    nullOr = t: mkOptionType {
      name = "nullOr";
      description = "null or ${t.description}";
      check = x: x == null || t.check x;
      merge = loc: defs:
        if all (d: d.value == null) defs then null
        else if any (d: d.value == null) defs then
          throw "The option `${showOption loc}' is defined both null and not null:${showDefs defs}"
        else t.merge loc defs;
    };
    either = a: b: mkOptionType {
      name = "either";
      description = "${a.description} or ${b.description}";
      check = x: a.check x || b.check x;
      merge = loc: defs:
        if all (d: a.check d.value) defs then a.merge loc defs
        else if all (d: b.check d.value) defs then b.merge loc defs
        else mergeEqualOption loc defs;
    };
    listOf = t: mkOptionType {
      name = "listOf";
      description = "list of ${t.description}";
      check = isList;
      merge = loc: defs:
        concatMap
          (d: genList
            (i: checkedMerge t (loc ++ [ "[definition ${toString i}]" ]) [ (d // { value = builtins.elemAt d.value i; }) ])
            (length d.value))
          defs;
    };
    attrsOf = t: mkOptionType {
      name = "attrsOf";
      description = "attribute set of ${t.description}";
      check = isAttrs;
      merge = loc: defs:
        let names = unique (concatMap (d: attrNames d.value) defs); in
        listToAttrs (concatMap
          (n:
            let elemDefs = applicableDefs (concatMap (d: optional (d.value ? ${n}) { inherit (d) file; value = d.value.${n}; }) defs); in
            optional (elemDefs != [ ]) { name = n; value = checkedMerge t (loc ++ [ n ]) elemDefs; })
          names);
    };
    submodule = module: mkOptionType {
      name = "submodule";
      description = "submodule";
      check = x: isAttrs x || isFunction x;
      merge = loc: defs:
        (evalModules {
          prefix = loc;
          modules = [ module ] ++ map (d: { _file = d.file; config = d.value; }) defs;
        }).config;
    };
  };

  # Merge that accepts nested attribute sets and lists, as types.anything does.
  mergeAnything = loc: defs:
    if all (d: isAttrs d.value && !(d.value ? _type)) defs then (types.attrsOf types.anything).merge loc defs
    else if all (d: isList d.value) defs then concatMap (d: d.value) defs
    else mergeEqualOption loc defs;

  checkedMerge = type: loc: defs:
    let bad = filter (d: !(type.check d.value)) defs; in
    if bad != [ ] then
      throw "A definition for option `${showOption loc}' is not of type `${type.description}'. Definition values:${showDefs bad}"
    else type.merge loc defs;

  # --- evalModules ------------------------------------------------------------------------------
  # modules: functions or attribute sets ({ options, config, imports } or shorthand config).
  evalModules = { modules, specialArgs ? { }, prefix ? [ ] }:
    let
      args = specialArgs // { inherit lib config; options = declared; };
      load = file: m:
        let
          f = if isPath m || isString m then import m else m;
          v = if isFunction f then f args else f;
          name = if isPath m || isString m then toString m else v._file or "<unknown-file>";
          # As in nixpkgs: without `options` or `config`, everything but imports is config.
          isFull = v ? options || v ? config;
          body = removeAttrs v [ "_file" "imports" ];
        in
        [
          {
            file = name;
            options = if isFull then body.options or { } else { };
            config = if isFull then body.config or { } else body;
          }
        ]
        ++ concatMap (load name) (v.imports or [ ]);
      loaded = concatMap (load "<module>") modules;

      # Declarations: merge the option trees of all modules (a name declared twice is an error).
      mergeDecls = a: b:
        a // listToAttrs (map
          (n: {
            name = n;
            value =
              if !(a ? ${n}) then b.${n}
              else if isOption a.${n} || isOption b.${n} then throw "The option `${n}' is declared more than once."
              else mergeDecls a.${n} b.${n};
          })
          (attrNames b));
      declared = foldl' (acc: m: mergeDecls acc m.options) { } loaded;

      # Definitions, as { loc, file, value }, with mkIf pushed down to the options it guards.
      # At an option the value is left unforced: resolve handles its mkIf when the option is read.
      defsOf = file: opts: loc: v:
        if isOption opts then [{ inherit loc file; value = v; }]
        else if isAttrs v && (v._type or null) == "if" then
          map (d: d // { value = mkIf v.condition d.value; }) (defsOf file opts loc v.content)
        else if isAttrs v then
          concatMap
            (n:
              if opts ? ${n} then defsOf file opts.${n} (loc ++ [ n ]) v.${n}
              else throw "The option `${showOption (prefix ++ loc ++ [ n ])}' does not exist. Definition values:${showDefs [ { inherit file; value = v.${n}; } ]}")
            (attrNames v)
        else throw "The option path `${showOption (prefix ++ loc)}' is an attribute set of options, but is defined as ${showValue v} in `${file}'";
      allDefs = concatMap (m: defsOf m.file declared [ ] m.config) loaded;

      valueOf = loc: opt:
        let
          defs = applicableDefs (filter (d: d.loc == loc) allDefs);
          type = opt.type or types.unspecified;
        in
        if defs != [ ] then checkedMerge type (prefix ++ loc) defs
        else if opt ? default then opt.default
        else throw "The option `${showOption (prefix ++ loc)}' is used but not defined.";

      build = loc: opts:
        if isOption opts then valueOf loc opts
        else listToAttrs (map (n: { name = n; value = build (loc ++ [ n ]) opts.${n}; }) (attrNames opts));
      config = build [ ] declared;
    in
    { inherit config; options = declared; };

  lib = {
    inherit types mkOption mkEnableOption mkIf mkOverride mkDefault mkForce literalExpression
      evalModules hasPrefix removePrefix optional optionals optionalAttrs optionalString unique
      escapeShellArg escapeShellArgs concatStringsSep concatMap filter elem any all attrNames
      isDerivation showOption;
  };
in
lib
